"""Reward and fidelity over training (docs/algorithm.md §7, docs/pipeline.md): each run's EMA generator at the steps of
align.evaluate_at, sampled and scored like its final generator, whose set is the run's point at its final step. Per
run setting (the run id without its seed) and step: the seed-mean of the held-out reward, FID to real renders and FID
to the teacher's samples, their standard deviation over seeds, and the seed-mean of each set's 95% bootstrap bounds."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd

from didr.evaluation.fronts import split_seed

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FIDELITY = ("fid_real", "fid_teacher")  # each with _low/_high bounds when the score stage recorded them


def table_name(reward: str) -> str:
    """The report's table of one reward over training."""
    return f"over_training_{reward}.csv"


def figure_name(reward: str) -> str:
    """The report's figure of one reward over training."""
    return f"over_training_{reward}.png"


def with_steps(scored: pd.DataFrame) -> pd.DataFrame:
    """The sets of the runs that have snapshots, each at its step: a snapshot's `step`, and the run's final step
    (`final_step`) for its final set, the set with the same method and setting and no step. ValueError names a run
    whose snapshots are scored but whose final set is not."""
    snapshots = scored[scored["step"].notna()]
    runs = snapshots[["method", "setting", "final_step"]].drop_duplicates(["method", "setting"])
    finals = scored[scored["step"].isna()].drop(columns=["final_step"]).merge(runs, on=["method", "setting"])
    missing = set(zip(runs["method"], runs["setting"], strict=True)) - set(
        zip(finals["method"], finals["setting"], strict=True)
    )
    if missing:
        method, setting = sorted(missing)[0]
        raise ValueError(f"{method} {setting}: snapshot sets are scored but not the run's final set")
    sets = pd.concat([snapshots, finals.assign(step=finals["final_step"])], ignore_index=True)
    return sets.assign(step=sets["step"].astype(int))


def over_training_table(sets: pd.DataFrame, reward: str) -> pd.DataFrame:
    """Rows per (method, setting without seed, step), in that order: `seeds`, the seed-mean of `reward` (the sets'
    <reward>_mean) and of each FIDELITY column with its standard deviation over seeds (<column>_sd, empty for one
    seed), and the seed-mean of its bootstrap bounds (<column>_low, _high) where the sets have them."""
    split = sets["setting"].map(split_seed)
    frame = sets.assign(setting=split.str[0], **{reward: sets[f"{reward}_mean"]})
    spread = [reward, *(c for c in FIDELITY if c in frame)]
    bounds = [f"{c}_{side}" for c in FIDELITY for side in ("low", "high") if f"{c}_{side}" in frame]
    grouped = frame.groupby(["method", "setting", "step"], sort=True)
    table = grouped[spread + bounds].mean()
    table = table.join(grouped[spread].std(ddof=1).add_suffix("_sd")).join(grouped.size().rename("seeds"))
    order = ["seeds", *(name for c in spread for name in (c, f"{c}_sd", f"{c}_low", f"{c}_high") if name in table)]
    return table[order].reset_index()


def plot_over_training(table: pd.DataFrame, reward: str, path: Path) -> None:
    """A panel per measure (the reward, then FID-real and FID-teacher) against step, a line per run setting; error
    bars: the standard deviation over seeds; bands: the bootstrap bounds."""
    measures = [reward, *(c for c in FIDELITY if c in table)]
    fig, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.4), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        for (method, setting), run in table.groupby(["method", "setting"], sort=True):
            spread = run[f"{measure}_sd"].fillna(0)
            bars = ax.errorbar(run["step"], run[measure], yerr=spread, marker="o", capsize=3, linewidth=1,
                               label=f"{method} {setting}")  # fmt: skip
            if f"{measure}_low" in run:
                colour = bars.lines[0].get_color()
                ax.fill_between(run["step"], run[f"{measure}_low"], run[f"{measure}_high"], color=colour, alpha=0.15)
        better = "higher" if measure == reward else "lower"
        ax.set_title(f"{measure} ({better} is better)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def caption(table: pd.DataFrame, reward: str) -> str:
    """One line: what the figure draws, from how many seeds."""
    seeds = sorted({int(n) for n in table["seeds"]})
    counts = "/".join(str(n) for n in seeds)
    spread = "error bars: the standard deviation over seeds; " if seeds[-1] > 1 else ""
    return (
        f"{reward} and FID (to real renders, to the teacher's samples) against the training step, a line per run "
        f"setting, each point the mean over {counts} seed(s) of the EMA generator's set at that step (the last "
        f"point: the run's final set); {spread}bands: the sets' 95% bootstrap intervals (mean bounds over seeds)."
    )


def write_over_training(scored: pd.DataFrame, rewards: list[str], out: Path) -> list[tuple[str, str]]:
    """Per reward, out/over_training_<reward>.{csv,png} from the scored sets (a row per set with `step` and
    `final_step`, empty for sets that are no snapshot); returns (figure file name, caption) per reward, none when no
    set is a snapshot."""
    if scored["step"].isna().all():
        return []
    sets = with_steps(scored)
    figures = []
    for reward in rewards:
        table = over_training_table(sets, reward)
        table.to_csv(out / table_name(reward), index=False)
        plot_over_training(table, reward, out / figure_name(reward))
        figures.append((figure_name(reward), caption(table, reward)))
    return figures
