"""Fronts compared at matched reward, over the common reward range, with bootstrap intervals (issue 11, item 3), on
synthetic fronts whose answers are known by hand."""

import numpy as np
import pandas as pd
import pytest

from didr.evaluation.fronts import (
    band_hypervolume,
    common_range,
    compare_fronts,
    cost_at,
    method_runs,
)
from didr.grid import front_point
from didr.stages.report import front_table, matched_reward, set_front, with_fronts


def runs_table(method, points, seeds=(0,), noise=0.0, rng=None):
    """Rows (method, strength, seed, reward, cost): one per point (reward, cost) and seed, cost plus N(0, noise)."""
    rows = []
    for strength, (reward, cost) in enumerate(points):
        for seed in seeds:
            jitter = 0.0 if rng is None else rng.normal(0.0, noise)
            rows.append({"method": method, "strength": float(strength), "seed": seed, "reward": reward,
                         "cost": cost + jitter})  # fmt: skip
    return pd.DataFrame(rows)


A = [(1.0, 10.0), (2.0, 20.0), (3.0, 40.0), (2.5, 50.0)]  # the last is dominated by (3, 40): off the front
B = [(1.5, 5.0), (2.5, 15.0), (4.0, 100.0)]


def test_the_front_is_interpolated_linearly_in_reward_and_skips_dominated_runs():
    (a,) = method_runs(runs_table("a", A))
    reward, cost = a.curve()
    assert reward.tolist() == [1.0, 2.0, 3.0] and cost.tolist() == [10.0, 20.0, 40.0]
    levels = np.array([0.5, 1.0, 2.5, 2.75, 3.5])  # below the front: its first cost (free disposal); above: none
    np.testing.assert_allclose(cost_at(a.curve(), levels), [10.0, 10.0, 30.0, 35.0, np.nan])


def test_a_front_of_one_dominating_run_is_compared_over_the_rewards_its_runs_reached():
    """b's best run dominates its others: b's front is one point, yet b's runs span rewards 1 to 4, so a and b
    compare on [1, 3], b at its dominating run's cost throughout."""
    table = pd.concat([runs_table("a", A), runs_table("b", [(1.0, 30.0), (2.0, 40.0), (4.0, 5.0)])])
    result = compare_fronts(table, levels=3, resamples=20)
    assert result.band == (1.0, 3.0)
    gap = result.differences.set_index("reward")["cost_difference"]
    np.testing.assert_allclose(gap.to_numpy(), [10.0 - 5.0, 20.0 - 5.0, 40.0 - 5.0])


def test_matched_reward_costs_and_differences_inside_the_common_range():
    table = pd.concat([runs_table("a", A), runs_table("b", B)])
    result = compare_fronts(table, levels=4, resamples=50)
    assert result.band == (1.5, 3.0)
    at = result.at_levels.set_index(["method", "reward"])["cost"]
    assert at[("a", 2.0)] == pytest.approx(20.0) and at[("b", 2.0)] == pytest.approx(10.0)
    assert at[("a", 1.5)] == pytest.approx(15.0) and at[("b", 3.0)] == pytest.approx(15.0 + 85.0 / 3)
    gap = result.differences.set_index("reward")
    assert gap.loc[2.0, "cost_difference"] == pytest.approx(10.0)
    assert (gap["low"] == gap["cost_difference"]).all()  # one seed: every replicate is the observed front


def test_fronts_without_a_common_reward_range_are_refused_in_one_line():
    table = pd.concat([runs_table("a", [(1.0, 10.0), (2.0, 20.0)]), runs_table("b", [(3.0, 5.0), (4.0, 9.0)])])
    with pytest.raises(ValueError, match=r"share no range.*a \[1, 2\], b \[3, 4\]") as info:
        common_range(method_runs(table))
    assert "\n" not in str(info.value)


def test_hypervolume_counts_the_common_reward_range_only():
    (a,) = method_runs(runs_table("a", A))
    # R in (1.5, 2]: best cost 20 -> 80 x 0.5; R in (2, 3]: 40 -> 60 x 1
    assert band_hypervolume(a.curve(), (1.5, 3.0), 100.0) == pytest.approx(100.0)
    # above the front's top reward nothing is dominated
    assert band_hypervolume(a.curve(), (2.0, 5.0), 100.0) == pytest.approx(60.0)
    table = pd.concat([runs_table("a", A), runs_table("b", B)])
    volumes = compare_fronts(table, resamples=20, cost_ref=100.0).hypervolumes.set_index("method")["hypervolume"]
    # b over (1.5, 2.5]: 85 x 1; (2.5, 3]: best reaching cost 100 -> 0
    assert volumes["a"] == pytest.approx(100.0) and volumes["b"] == pytest.approx(85.0)


def test_bootstrap_intervals_over_seeds_cover_the_true_cost():
    """True front cost = 10 R, each seed's cost off by N(0, 2): the 95% interval of the cost at R = 2.5 (the mean of
    two strengths' 8-seed means, sd 0.5) covers 25 in most of 100 experiments and is about 2 x 1.96 x 0.5 wide."""
    rng = np.random.default_rng(0)
    truth = [(r, 10.0 * r) for r in (1.0, 2.0, 3.0, 4.0)]
    covered, widths = 0, []
    for _ in range(100):
        table = runs_table("a", truth, seeds=range(8), noise=2.0, rng=rng)
        row = compare_fronts(table, levels=7, resamples=200, seed=int(rng.integers(1 << 30))).at_levels.iloc[3]
        assert row["reward"] == pytest.approx(2.5)
        covered += row["low"] <= 25.0 <= row["high"]
        widths.append(row["high"] - row["low"])
    assert 0.85 <= covered / 100 <= 1.0
    assert 1.4 < np.mean(widths) < 2.2


def test_the_report_writes_the_matched_reward_table_figure_and_refusals(tmp_path):
    """Three seeds per setting; c's front lies above the others' rewards: its pairs are refused, a vs b compared."""
    sets = []
    for method, points in (("a", A[:3]), ("b", B), ("c", [(10.0, 1.0), (11.0, 2.0)])):
        for strength, (reward, cost) in enumerate(points):
            for seed in range(3):
                sets.append({"method": method, "setting": f"x={strength}/seed={seed}", "toy_mean": reward + 0.01 * seed,
                             "fid_real": cost, "fid_teacher": cost / 2})  # fmt: skip
    sets.append({"method": "one-step (warm start)", "setting": "t_star=0.9", "toy_mean": 1.0, "fid_real": 120.0,
                 "fid_teacher": 60.0})  # fmt: skip
    text = matched_reward(with_fronts(pd.DataFrame(sets)), ["toy"], tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"matched_toy.csv", "matched_toy.png"}
    both = pd.read_csv(tmp_path / "matched_toy.csv")
    assert list(both["cost"].unique()) == ["fid_real", "fid_teacher"]  # FID to real renders and to the teacher
    to_teacher = both[both["cost"] == "fid_teacher"].reset_index(drop=True)
    assert to_teacher["difference"].iloc[2] == pytest.approx(6.25)  # half of fid_real's 12.5 below
    assert "## toy: fid_teacher at matched reward" in text
    table = both[both["cost"] == "fid_real"].reset_index(drop=True)
    assert set(zip(table["method_a"], table["method_b"], strict=True)) == {("a", "b")}
    assert table["band_low"].iloc[0] == pytest.approx(1.51) and table["band_high"].iloc[0] == pytest.approx(3.01)
    middle = table.iloc[2]  # reward 2.26: a at (2.26 - 2.01) x 20 + 20 = 25, b at (2.26 - 1.51) x 10 + 5 = 12.5
    assert middle["cost_a"] == pytest.approx(25.0) and middle["difference"] == pytest.approx(12.5)
    assert (table["seeds_a"] == 3).all()
    assert "- refused: a vs c: the methods' rewards share no range" in text and "b vs c" in text
    assert "gain over the warm start" in text and "| 2.26 | +1.26 |" in text


def test_a_methods_grid_entries_are_fronts_of_their_own_compared_with_the_other_methods(tmp_path):
    """didr's runs with drs=k-step form their own front: each didr front is compared with dmd2, not with each other;
    the Pareto table groups them the same way."""
    assert front_point("didr", "beta=0.001/drs=k-step/drs_steps=2/seed=1") == ("didr drs=k-step,drs_steps=2",
                                                                              "beta=0.001", 1)  # fmt: skip
    assert front_point("didr", "beta=0.001/seed=2") == ("didr", "beta=0.001", 2)
    assert front_point("sdpo", "seed=0") == ("sdpo", "", 0)
    with pytest.raises(ValueError, match="expected method=<m>/<axis>=<value>"):
        front_point("one-step (warm start)", "t_star=0.9")
    assert set_front("one-step (warm start)", "t_star=0.9") == ("one-step (warm start)", "t_star=0.9", 0)
    assert set_front("a", "x=1/seed=2") == ("a", "x=1", 2)
    sets = []
    for setting, points in (("beta={}", A[:3]), ("beta={}/drs=k-step/drs_steps=2", B), ("weight={}", A[:3])):
        method = "dmd2" if setting.startswith("weight") else "didr"
        for strength, (reward, cost) in enumerate(points):
            for seed in range(2):
                sets.append({"method": method, "setting": f"{setting.format(strength + 1)}/seed={seed}",
                             "toy_mean": reward, "fid_real": cost, "fid_teacher": cost})  # fmt: skip
    table = with_fronts(pd.DataFrame(sets))
    matched_reward(table, ["toy"], tmp_path)
    pairs = pd.read_csv(tmp_path / "matched_toy.csv")
    assert set(zip(pairs["method_a"], pairs["method_b"], strict=True)) == {
        ("didr", "dmd2"), ("didr drs=k-step,drs_steps=2", "dmd2")}  # fmt: skip
    same = pairs[pairs["method_a"] == "didr"]  # identical fronts: no difference anywhere
    assert np.abs(same["difference"]).max() == 0.0
    fronts = front_table(table, "toy")
    assert sorted(fronts["method"]) == ["didr", "didr drs=k-step,drs_steps=2", "dmd2"]
    assert fronts.set_index("method").loc["didr drs=k-step,drs_steps=2", "points"] == 6
