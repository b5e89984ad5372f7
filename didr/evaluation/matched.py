"""The report's matched-reward comparison (docs/algorithm.md §7.1): per pair of methods, fidelity at equal reward over
their common reward range with bootstrap intervals over seeds, as a table, a figure and a markdown section."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd

from didr.evaluation.fronts import compare_pairs, split_seed

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESAMPLES, LEVELS = 1000, 5


def run_points(sets: pd.DataFrame, reward: str, cost: str) -> pd.DataFrame:
    """The aligned sets of a metrics table (method, setting, <reward>_mean, <cost>) as fronts.COLUMNS rows: the
    strength is the setting without its seed."""
    split = sets["setting"].map(split_seed)
    return pd.DataFrame({"method": sets["method"], "strength": split.str[0], "seed": split.str[1],
                         "reward": sets[f"{reward}_mean"], "cost": sets[cost]})  # fmt: skip


def plot_pairs(
    pairs: pd.DataFrame, points: pd.DataFrame, refused: list[str], reward: str, cost: str, path: Path
) -> None:
    """A panel per compared pair: each method's cost at matched reward with its interval band, over the pair's
    common range, and every run as a faint point; refused pairs are named above the panels."""
    names = list(dict.fromkeys(zip(pairs.get("method_a", []), pairs.get("method_b", []), strict=True)))
    colours = {m: f"C{i}" for i, m in enumerate(sorted(points["method"].unique()))}  # one colour per method
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5 * max(1, len(names)), 4), squeeze=False)
    for ax, (a, b) in zip(axes[0], names, strict=False):
        rows = pairs[(pairs["method_a"] == a) & (pairs["method_b"] == b)]
        for key, method in (("a", a), ("b", b)):
            seeds = int(rows[f"seeds_{key}"].iloc[0])
            colour = colours[method]
            ax.plot(rows["reward"], rows[f"cost_{key}"], "-", color=colour, label=f"{method} ({seeds} seeds)")
            ax.fill_between(rows["reward"], rows[f"cost_{key}_low"], rows[f"cost_{key}_high"], alpha=0.25, color=colour)
            runs = points[points["method"] == method]
            ax.plot(runs["reward"], runs["cost"], ".", alpha=0.4, color=colour)
        ax.set_title(f"{a} vs {b}", fontsize=9)
        ax.set_xlabel(f"{reward} (matched)")
        ax.set_ylabel(f"{cost} (lower is better)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if refused:
        fig.suptitle("no common reward range: " + ", ".join(line.split(":")[0] for line in refused), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(pairs: pd.DataFrame, refused: list[str], reward: str, cost: str, baseline: float | None) -> str:
    """The section of matched.md for one reward: a table per pair, its band hypervolumes, the refused pairs."""
    text = [f"## {reward}: {cost} at matched reward (95% bootstrap intervals over seeds)\n"]
    for (a, b), rows in [] if pairs.empty else pairs.groupby(["method_a", "method_b"], sort=False):
        first = rows.iloc[0]
        gain = "" if baseline is None else " | gain over the warm start"
        header = f"| {reward}{gain} | {a} | {b} | {a} - {b} |"
        rule = "|---|---|---|---|" + ("---|" if gain else "")
        text += [f"**{a} vs {b}**, common range [{first['band_low']:.4g}, {first['band_high']:.4g}]\n", header, rule]
        for _, r in rows.iterrows():
            cells = [f"{r['reward']:.4g}"] + ([] if baseline is None else [f"{r['reward'] - baseline:+.4g}"])
            cells += [
                f"{r[f'{k}']:.4g} [{r[f'{k}_low']:.4g}, {r[f'{k}_high']:.4g}]"
                for k in ("cost_a", "cost_b", "difference")
            ]
            text.append("| " + " | ".join(cells) + " |")
        volumes = ", ".join(f"{m} {first[f'hypervolume_{k}']:.4g} [{first[f'hypervolume_{k}_low']:.4g}, "
                            f"{first[f'hypervolume_{k}_high']:.4g}]" for k, m in (("a", a), ("b", b)))  # fmt: skip
        text.append(f"\nHypervolume over the common range only: {volumes}.\n")
    text += [f"- refused: {line}" for line in refused]
    return "\n".join(text) + "\n"


def write_matched(
    sets: pd.DataFrame, reward: str, folder: Path, cost: str, cost_ref: float, baseline: float | None
) -> str:
    """folder/matched_<reward>.csv and .png for the aligned `sets`; returns the markdown section."""
    points = run_points(sets, reward, cost)
    pairs, refused = compare_pairs(points, levels=LEVELS, resamples=RESAMPLES, cost_ref=cost_ref)
    pairs.to_csv(folder / f"matched_{reward}.csv", index=False)
    plot_pairs(pairs, points, refused, reward, cost, folder / f"matched_{reward}.png")
    return markdown(pairs, refused, reward, cost, baseline)
