"""The ablation grid: run ids, their inverse, the align options they give, and --set overrides of a params file."""

import pytest

from didr.config import ConfigError, apply_overrides, load_params
from didr.grid import Run, expand_grid, parse_run_id


def test_the_grid_expands_to_readable_run_ids_in_axis_order():
    grid = {
        "seeds": [0, 1],
        "methods": {"didr": {"drs_t_max": [0.5, 0.9], "beta": [0.03]}, "dipp": {"alpha": [3]}, "di": {}},
    }
    ids = [run.id for run in expand_grid(grid)]
    assert ids == [
        "method=didr/beta=0.03/drs_t_max=0.5/seed=0",
        "method=didr/beta=0.03/drs_t_max=0.5/seed=1",
        "method=didr/beta=0.03/drs_t_max=0.9/seed=0",
        "method=didr/beta=0.03/drs_t_max=0.9/seed=1",
        "method=dipp/alpha=3/seed=0",
        "method=dipp/alpha=3/seed=1",
        "method=di/seed=0",
        "method=di/seed=1",
    ]
    assert [parse_run_id(i) for i in ids] == expand_grid(grid)


def test_a_run_id_gives_the_align_options():
    run = parse_run_id("method=didr/beta=0.01/drs=k-step/drs_steps=4/seed=3")
    assert run == Run("didr", 0.01, 3, (("drs", "k-step"), ("drs_steps", 4)))
    assert run.align_options() == [
        "--method", "didr", "--strength", "0.01", "--seed", "3", "--set=align.drs=k-step", "--set=align.drs_steps=4",
    ]  # fmt: skip
    assert run.setting == "beta=0.01/drs=k-step/drs_steps=4/seed=3"


@pytest.mark.parametrize(
    ("run_id", "message"),
    [
        ("method=didr/beta=1", "expected method=<m>/<axis>=<value>/.../seed=<s>"),
        ("didr/beta=1/seed=0", "expected method="),
        ("method=dird/beta=1/seed=0", "unknown method 'dird'"),
        ("method=didr/beta=1/seed=x", "expected method="),
    ],
)
def test_malformed_run_ids_are_named(run_id, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_run_id(run_id)
    assert run_id in str(info.value)


def test_overrides_are_typed_like_yaml_and_checked_by_the_schema(tmp_path):
    data = apply_overrides({"align": {"lr": 1.0}}, ["align.lr=1e-05", "align.drs=k-step", "align.steps=7", "seed=3"])
    assert data == {"align": {"lr": 1e-05, "drs": "k-step", "steps": 7}, "seed": 3}
    path = tmp_path / "params.yaml"
    path.write_text("align:\n  steps: 5\n")
    assert load_params(path, ["align.drs_t_max=0.9"]).align.drs_t_max == 0.9
    with pytest.raises(ConfigError, match=rf"{path}: align.drs_t_max: 2 is greater than the maximum of 1"):
        load_params(path, ["align.drs_t_max=2"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_params(path, ["align.drs_t_max"])


def test_a_method_may_list_entries_each_expanded_on_its_own():
    """One-factor ablations: each entry of a method's list is its own product of axes, not crossed with the others."""
    grid = {
        "seeds": [0, 1],
        "methods": {"didr": [{"beta": [1.0, 0.1]}, {"beta": [0.1], "drs": ["curvature"], "drs_steps": [2]}],
                    "dmd2": {"weight": [3]}},
    }  # fmt: skip
    assert [run.id for run in expand_grid(grid)] == [
        "method=didr/beta=1/seed=0",
        "method=didr/beta=1/seed=1",
        "method=didr/beta=0.1/seed=0",
        "method=didr/beta=0.1/seed=1",
        "method=didr/beta=0.1/drs=curvature/drs_steps=2/seed=0",
        "method=didr/beta=0.1/drs=curvature/drs_steps=2/seed=1",
        "method=dmd2/weight=3/seed=0",
        "method=dmd2/weight=3/seed=1",
    ]


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("{didr: [{beta: [0.001]}, {beta: [0.001, 0.01]}]}",
         r"grid\.methods\.didr\[1\]: run method=didr/beta=0\.001/seed=0 is already in an earlier entry"),
        ("{didr: [{beta: [0.001]}, {beta: [0.001], gamma: [2]}]}", r"grid\.methods\.didr\[1\]\.gamma: unknown key"),
        ("{didr: {beta: [1], gamma: [2]}}", r"grid\.methods\.didr\.gamma: unknown key \(known: beta\)"),
        ("{didr: {}}", r"grid\.methods\.didr\.beta: missing"),
        ("{didr: [{beta: []}]}", r"grid\.methods\.didr\[0\]\.beta: no values"),
        ("{didr: []}", r"grid\.methods\.didr: no values"),
        ("{didr: [{beta: [1]}], dmd2: [{weight: [1], time_sampling: [normal]}]}",
         r"grid\.methods\.dmd2\[0\]\.time_sampling\[0\]: 'normal' is not one of \['uniform', 'logit_normal'\]"),
    ],
)  # fmt: skip
def test_grid_entries_and_lists_of_them_are_checked_in_one_line(tmp_path, methods, message):
    path = tmp_path / "params.yaml"
    path.write_text(f"grid:\n  seeds: [0]\n  methods: {methods}\n")
    with pytest.raises(ConfigError, match=rf"{path}: {message}"):
        load_params(path)
