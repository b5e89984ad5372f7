"""Fronts compared where they can be compared: fidelity at matched reward and hypervolume over the common reward
range, with bootstrap confidence intervals over seeds (docs/algorithm.md §7.1).

Each method's runs are points (reward, cost) per strength and seed. A method's curve is the Pareto front of its
seed-mean points; its cost at reward R is the front's piecewise-linear interpolation in reward, below the front the
cost of its lowest-reward point (which has at least that reward: free disposal, as in the hypervolume), above the
front undefined (NaN). The comparison is made only inside the common range [max_m min R_m, min_m max R_m] of the
rewards the methods' settings reached; methods with no common range are refused. Intervals resample, per method
and strength, the seeds with replacement (percentile bootstrap).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from didr.evaluation.pareto import pareto_front

COLUMNS = ("method", "strength", "seed", "reward", "cost")


@dataclass(frozen=True)
class MethodRuns:
    """One method's runs: rewards and costs of shape [strengths, seeds] (NaN where a seed is missing)."""

    method: str
    strengths: tuple[float, ...]
    reward: np.ndarray
    cost: np.ndarray

    def span(self) -> tuple[float, float]:
        """The lowest and highest seed-mean reward of the method's settings."""
        reward = np.nanmean(self.reward, 1)
        return float(reward.min()), float(reward.max())

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The Pareto front of the seed-mean points as (reward, cost), by increasing reward."""
        return front_curve(np.nanmean(self.reward, 1), np.nanmean(self.cost, 1))

    def resampled_means(self, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per bootstrap replicate and strength, the mean reward and cost over the picked seed columns
        (`picks` [count, strengths, seeds]), each [count, strengths]."""
        strength = np.arange(self.reward.shape[0])[None, :, None]
        return self.reward[strength, picks].mean(2), self.cost[strength, picks].mean(2)


def front_curve(reward: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto front (§7) of the points (cost_i, reward_i) as (reward, cost) arrays, by increasing reward."""
    points = list(zip(cost.tolist(), reward.tolist(), strict=True))
    front = sorted((points[i][1], points[i][0]) for i in pareto_front(points))
    return np.array([r for r, _ in front]), np.array([c for _, c in front])


def method_runs(table: pd.DataFrame) -> list[MethodRuns]:
    """The runs of each method of a table with COLUMNS, by method name; ValueError naming a missing column."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"front table: missing column(s) {missing}; need {list(COLUMNS)}")
    runs = []
    for method, group in table.groupby("method", sort=True):
        reward = group.pivot_table(index="strength", columns="seed", values="reward", aggfunc="mean", dropna=False)
        cost = group.pivot_table(index="strength", columns="seed", values="cost", aggfunc="mean", dropna=False)
        runs.append(MethodRuns(str(method), tuple(reward.index.tolist()), reward.to_numpy(), cost.to_numpy()))
    return runs


def cost_at(curve: tuple[np.ndarray, np.ndarray], levels: np.ndarray) -> np.ndarray:
    """The front's cost at each reward level: linear between its points, its first point's cost below them, NaN
    above them."""
    reward, cost = curve
    return np.interp(levels, reward, cost, left=cost[0], right=np.nan)


def band_hypervolume(curve: tuple[np.ndarray, np.ndarray], band: tuple[float, float], cost_ref: float) -> float:
    """The dominated hypervolume (§7) inside the reward band only: the integral over R in band of
    max(0, cost_ref - min{cost_i : reward_i >= R}) (a reward the front never reaches adds nothing)."""
    low, high = band
    reward, cost = curve
    edges = np.unique(np.clip(np.concatenate([[low, high], reward]), low, high))
    area = 0.0
    for a, b in itertools.pairwise(edges.tolist()):
        reaching = cost[reward >= b]  # the staircase is constant on (a, b]
        if reaching.size:
            area += (b - a) * max(0.0, cost_ref - float(reaching.min()))
    return area


def common_range(runs: list[MethodRuns]) -> tuple[float, float]:
    """[max of the methods' lowest rewards, min of their highest]; ValueError, one line, when it is empty."""
    spans = {r.method: r.span() for r in runs}
    low, high = max(s[0] for s in spans.values()), min(s[1] for s in spans.values())
    if not low < high:
        listed = ", ".join(f"{m} [{a:.4g}, {b:.4g}]" for m, (a, b) in spans.items())
        raise ValueError(f"the methods' rewards share no range, so their fronts cannot be compared: {listed}")
    return low, high


def replicates(runs: MethodRuns, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` bootstrap draws of seed columns per strength, [count, strengths, seeds] (observed seeds only)."""
    strengths, seeds = runs.reward.shape
    draws = np.empty((count, strengths, seeds), dtype=np.int64)
    for i in range(strengths):
        observed = np.flatnonzero(~np.isnan(runs.reward[i]))
        draws[:, i, :] = rng.choice(observed, size=(count, seeds))
    return draws


@dataclass(frozen=True)
class Comparison:
    """Per method and reward level: cost with its interval; per pair, the cost difference with its interval; per
    method, the hypervolume over the common range with its interval."""

    band: tuple[float, float]
    at_levels: pd.DataFrame
    differences: pd.DataFrame
    hypervolumes: pd.DataFrame


def compare_fronts(
    table: pd.DataFrame,
    levels: int = 5,
    cost_ref: float | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Fidelity at matched reward (`levels` rewards evenly spread over the common range, ends included) and the
    hypervolume over the common range, each with a percentile bootstrap interval; `cost_ref` defaults to 1.05 x the
    largest cost of the table. Replicates whose front does not reach a level are left out of that level's interval
    (their share is the `reached` column)."""
    runs = method_runs(table)
    band = common_range(runs)
    grid = np.linspace(band[0], band[1], levels)
    reference = float(table["cost"].max()) * 1.05 if cost_ref is None else cost_ref
    tails = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    rng = np.random.default_rng(seed)
    at_levels, hypervolumes, draws, observed = [], [], {}, {}
    for r in runs:
        curves = [front_curve(*means) for means in zip(*r.resampled_means(replicates(r, resamples, rng)), strict=True)]
        draws[r.method] = np.stack([cost_at(curve, grid) for curve in curves])
        observed[r.method] = cost_at(r.curve(), grid)
        volumes = [band_hypervolume(curve, band, reference) for curve in curves]
        low, high = np.percentile(volumes, tails)
        hypervolumes.append({"method": r.method, "hypervolume": band_hypervolume(r.curve(), band, reference),
                             "low": low, "high": high, "seeds": r.reward.shape[1]})  # fmt: skip
        for k, (level, cost) in enumerate(zip(grid, observed[r.method], strict=True)):
            column = draws[r.method][:, k]
            reached = ~np.isnan(column)
            low, high = np.percentile(column[reached], tails) if reached.any() else (np.nan, np.nan)
            at_levels.append({"method": r.method, "reward": level, "cost": cost, "low": low, "high": high,
                              "reached": reached.mean()})  # fmt: skip
    differences = []
    for (a, da), (b, db) in itertools.combinations(draws.items(), 2):
        gap = observed[a] - observed[b]
        for k, level in enumerate(grid):
            column = da[:, k] - db[:, k]
            column = column[~np.isnan(column)]
            low, high = np.percentile(column, tails) if column.size else (np.nan, np.nan)
            differences.append({"method": a, "minus": b, "reward": level, "cost_difference": gap[k],
                                "low": low, "high": high})  # fmt: skip
    return Comparison(band, pd.DataFrame(at_levels), pd.DataFrame(differences), pd.DataFrame(hypervolumes))


def split_seed(setting: str) -> tuple[str, int]:
    """A run's setting without its seed, and the seed: 'beta=0.03/seed=2' -> ('beta=0.03', 2); no seed: 0."""
    parts = setting.split("/")
    seeds = [p for p in parts if p.startswith("seed=")]
    if len(seeds) != 1:
        return setting, 0
    return "/".join(p for p in parts if p not in seeds), int(seeds[0].removeprefix("seed="))


def family(front: str) -> str:
    """The method of a front ('didr' for 'didr drs=k-step')."""
    return front.split(" ", 1)[0]


def compare_pairs(table: pd.DataFrame, **options: Any) -> tuple[pd.DataFrame, list[str]]:
    """compare_fronts (with `options`) for each pair of fronts a < b of a table with COLUMNS from different methods
    (a method's variants are each compared with the other methods, not with each other), each pair over its own
    common range: a row per pair and reward level (both costs, the difference a - b and both band hypervolumes, each
    with its interval), and a line per pair refused for want of a common range."""
    rows, refused = [], []
    fronts = sorted(table["method"].unique())
    for a, b in [(a, b) for a, b in itertools.combinations(fronts, 2) if family(a) != family(b)]:
        try:
            result = compare_fronts(table[table["method"].isin([a, b])], **options)
        except ValueError as error:
            refused.append(f"{a} vs {b}: {error}")
            continue
        at = result.at_levels.set_index(["method", "reward"])
        volume = result.hypervolumes.set_index("method")
        for _, gap in result.differences.iterrows():
            level = gap["reward"]
            row = {"method_a": a, "method_b": b, "band_low": result.band[0], "band_high": result.band[1],
                   "reward": level}  # fmt: skip
            for key, m in (("a", a), ("b", b)):
                cost, volumes = at.loc[(m, level)], volume.loc[m]
                row |= {f"cost_{key}": cost["cost"], f"cost_{key}_low": cost["low"], f"cost_{key}_high": cost["high"],
                        f"hypervolume_{key}": volumes["hypervolume"], f"hypervolume_{key}_low": volumes["low"],
                        f"hypervolume_{key}_high": volumes["high"], f"seeds_{key}": volumes["seeds"]}  # fmt: skip
            rows.append(row | {"difference": gap["cost_difference"], "difference_low": gap["low"],
                               "difference_high": gap["high"]})  # fmt: skip
    return pd.DataFrame(rows), refused
