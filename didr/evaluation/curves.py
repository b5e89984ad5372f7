"""Training curves of the align runs: each scalar of a run's metrics.parquet (reward, losses, gradient norms, the DRS
norm of DIDR; docs/algorithm.md §6) against step, the grid's runs overlaid per method."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = ("reward", "loss", "loss_ikl", "loss_dm", "loss_fake", "grad_norm", "grad_norm_fake", "direction_norm",
          "drs_norm")  # fmt: skip
"""The panels' order; any other logged scalar follows them, alphabetically."""
NOT_DRAWN = ("step", "step_seconds")
TABLES = ("reward", "loss", "grad_norm", "drs_norm")
"""The metrics written as one table each (a column per run): what `dvc plots show` draws."""
PANEL_INCHES, DPI, COLUMNS = (4.0, 3.0), 100, 3


def figure_name(method: str) -> str:
    """The report's file of one method's training curves."""
    return f"curves_{method}.png"


def table_name(metric: str) -> str:
    """The report's file of one TABLES metric, a column per run."""
    return f"curves_{metric}.csv"


@dataclass(frozen=True)
class RunCurves:
    """One align run's logged scalars, a row per step."""

    run: str  # the run id (method=.../seed=N)
    method: str
    setting: str
    frame: pd.DataFrame


def read_run(folder: Path) -> RunCurves:
    """The curves of an align stage's output folder (params.json and metrics.parquet); ValueError naming a missing
    file."""
    params, metrics = folder / "params.json", folder / "metrics.parquet"
    for path in (params, metrics):
        if not path.is_file():
            raise ValueError(f"{path}: missing (not an align run's output? run `didr align` first)")
    record = json.loads(params.read_text(encoding="utf-8"))
    frame = pd.read_parquet(metrics).sort_values("step", ignore_index=True)
    return RunCurves(record["run"], record["method"], record["setting"], frame)


def panels(runs: list[RunCurves]) -> list[str]:
    """The scalars any of `runs` logged, in PANELS order, then the others alphabetically."""
    logged = {c for r in runs for c in r.frame.columns if c not in NOT_DRAWN}
    return [p for p in PANELS if p in logged] + sorted(logged - set(PANELS))


def curve_table(runs: list[RunCurves], metric: str) -> pd.DataFrame:
    """`step` (every step any run logged), then a column per run (its id) holding `metric`; empty where the run did
    not log it."""
    steps = sorted({int(s) for r in runs for s in r.frame["step"]})
    table = pd.DataFrame({"step": steps})
    for run in runs:
        logged = metric in run.frame.columns
        table[run.run] = table["step"].map(run.frame.set_index("step")[metric]) if logged else math.nan
    return table


def figure_size(n_panels: int) -> tuple[int, int]:
    """Pixel (width, height) of a figure of `n_panels` panels, COLUMNS a row."""
    columns, rows = min(COLUMNS, n_panels), math.ceil(n_panels / COLUMNS)
    return round(columns * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI)


def plot_method(runs: list[RunCurves], path: Path) -> list[str]:
    """One method's runs overlaid, a panel per logged scalar against step (a line per run, labelled with its
    setting); a PNG of figure_size pixels. Returns the panels drawn."""
    names = panels(runs)
    width, height = figure_size(len(names))
    rows, columns = math.ceil(len(names) / COLUMNS), min(COLUMNS, len(names))
    fig, axes = plt.subplots(rows, columns, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for run in runs:
            if name in run.frame.columns:
                ax.plot(run.frame["step"], run.frame[name], label=run.setting, linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{runs[0].method}: training curves", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return names


def caption(method: str, runs: list[RunCurves], names: list[str]) -> str:
    """The figure's caption: what it draws, from which runs."""
    settings = ", ".join(r.setting for r in runs)
    return (
        f"{method}: {', '.join(names)} against the training step, one line per run ({settings}), as each run's "
        "metrics.parquet logs them (per step: the generator's batch means; gradient norms before clipping)."
    )


def write_curves(run_dirs: list[Path], out: Path) -> list[tuple[str, str]]:
    """out/curves_<method>.png per method and out/curves_<metric>.csv per TABLES metric (a column per run, the runs
    in the order given); returns (figure file name, caption) per method, in the order the methods first appear."""
    runs = [read_run(folder) for folder in run_dirs]
    if not runs:
        return []
    for metric in TABLES:
        curve_table(runs, metric).to_csv(out / table_name(metric), index=False)
    figures = []
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        name = figure_name(method)
        figures.append((name, caption(method, mine, plot_method(mine, out / name))))
    return figures
