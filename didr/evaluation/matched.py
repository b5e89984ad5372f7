"""The report's matched-reward comparison (docs/algorithm.md §7.1): per pair of methods, fidelity at equal reward over
their common reward range with bootstrap intervals over seeds, as a table, a figure and a markdown section."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd

from didr.evaluation.fronts import compare_pairs

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESAMPLES, LEVELS = 1000, 5
PANELS_PER_ROW = 4


def run_points(sets: pd.DataFrame, reward: str, cost: str) -> pd.DataFrame:
    """The aligned sets of a metrics table (front, front_strength, seed, <reward>_mean, <cost>: the report stage
    names each set's front, didr.grid.front_point) as fronts.COLUMNS rows."""
    return pd.DataFrame({"method": sets["front"], "strength": sets["front_strength"], "seed": sets["seed"],
                         "reward": sets[f"{reward}_mean"], "cost": sets[cost]})  # fmt: skip


def plot_pairs(
    compared: list[tuple[str, pd.DataFrame, pd.DataFrame]], refused: list[str], reward: str, path: Path
) -> None:
    """Rows of at most PANELS_PER_ROW panels per cost (its name, pairs and run points), a panel per compared pair:
    each front's cost at matched reward with its interval band over the pair's common range, and every run as a faint
    point; refused pairs are named above the panels."""
    first = compared[0][1]
    names = list(dict.fromkeys(zip(first.get("method_a", []), first.get("method_b", []), strict=True)))
    colours = {m: f"C{i}" for i, m in enumerate(sorted(compared[0][2]["method"].unique()))}  # one colour per front
    columns = min(PANELS_PER_ROW, max(1, len(names)))
    lines = -(-max(1, len(names)) // columns)  # rows of panels per cost
    fig, axes = plt.subplots(
        len(compared) * lines, columns, figsize=(5 * columns, 4 * len(compared) * lines), squeeze=False
    )
    for k, (cost, pairs, points) in enumerate(compared):
        panels = axes[k * lines : (k + 1) * lines].ravel()
        for ax in panels[len(names) :]:
            ax.axis("off")
        for ax, (a, b) in zip(panels, names, strict=False):
            rows = pairs[(pairs["method_a"] == a) & (pairs["method_b"] == b)]
            for key, method in (("a", a), ("b", b)):
                seeds = int(rows[f"seeds_{key}"].iloc[0])
                colour = colours[method]
                ax.plot(rows["reward"], rows[f"cost_{key}"], "-", color=colour, label=f"{method} ({seeds} seeds)")
                ax.fill_between(
                    rows["reward"], rows[f"cost_{key}_low"], rows[f"cost_{key}_high"], alpha=0.25, color=colour
                )
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
    sets: pd.DataFrame, reward: str, folder: Path, costs: dict[str, float], baseline: float | None
) -> str:
    """folder/matched_<reward>.csv (a `cost` column: each fidelity column compared) and .png (a row per cost) for
    the aligned `sets`, each cost with its hypervolume reference point (`costs`); returns the markdown sections."""
    compared: list[tuple[str, pd.DataFrame, pd.DataFrame]] = []
    tables: list[pd.DataFrame] = []
    sections: list[str] = []
    refused: list[str] = []  # the pairs refused for want of a common range: the same for every cost
    for cost, cost_ref in costs.items():
        points = run_points(sets, reward, cost)
        pairs, refused = compare_pairs(points, levels=LEVELS, resamples=RESAMPLES, cost_ref=cost_ref)
        compared.append((cost, pairs, points))
        tables.append(pairs.assign(cost=cost)[["cost", *pairs.columns]])
        sections.append(markdown(pairs, refused, reward, cost, baseline))
    pd.concat(tables, ignore_index=True).to_csv(folder / f"matched_{reward}.csv", index=False)
    plot_pairs(compared, refused, reward, folder / f"matched_{reward}.png")
    return "\n".join(sections)
