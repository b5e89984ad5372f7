"""Stage `report`: the metrics table, reward-versus-fidelity Pareto plots with hypervolumes, and image grids."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from didr.evaluation.curves import write_curves
from didr.evaluation.fronts import split_seed
from didr.evaluation.matched import write_matched
from didr.evaluation.over_training import write_over_training
from didr.evaluation.pareto import hypervolume, pareto_front
from didr.evaluation.sampling import image_grid
from didr.grid import front_point
from didr.stages.common import read_run_params
from didr.stages.io import StageInputError, write_text_atomic
from didr.stages.score import load_images
from didr.training.atomic import atomic_dir

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REFERENCES = ("teacher", "one-step (warm start)")
THUMBNAIL = 128  # pixels per image in the grid, at most


def collect(score_dirs: list[Path]) -> pd.DataFrame:
    """One row per scored sample set, from each score stage's summary.json."""
    rows = []
    for folder in score_dirs:
        path = folder / "summary.json"
        if not path.is_file():
            raise StageInputError(f"{path}: missing (run `didr score` first)")
        rows.append(json.loads(path.read_text(encoding="utf-8")))
    return pd.DataFrame(rows)


def is_reference(methods: pd.Series) -> pd.Series:
    """The reference sets (stars, no front): the teacher and the warm starts, one-step or "K-step (warm start)"."""
    return methods.isin(REFERENCES) | methods.str.endswith("(warm start)")


def with_sample_records(table: pd.DataFrame, sample_dirs: list[Path]) -> pd.DataFrame:
    """The table with, from each set's sample folder's params.json (matched by the folder its score names), its
    network evaluations per image (`nfe`; empty for a set sampled before nfe was recorded) and, for a snapshot set
    (align.evaluate_at), its `step` and its run's `final_step` (empty for the other sets)."""
    records = {str(folder): read_run_params(folder) for folder in sample_dirs}
    return table.assign(**{key: table["sample_dir"].map({d: r.get(key) for d, r in records.items()})
                           for key in ("nfe", "step", "final_step")})  # fmt: skip


def set_front(method: str, setting: str) -> tuple[str, str, int]:
    """A set's front, strength and seed: a grid run's by didr.grid.front_point, another set's (no grid run id) its
    method and its setting without the seed."""
    try:
        return front_point(method, setting)
    except ValueError:
        return method, *split_seed(setting)


def with_fronts(table: pd.DataFrame) -> pd.DataFrame:
    """The table with each set's `front` (its method, or the variant of its method its grid entry names), its
    `front_strength` and `seed` (set_front)."""
    points = [set_front(m, s) for m, s in zip(table["method"], table["setting"], strict=True)]
    columns = ("front", "front_strength", "seed")
    return table.assign(**{c: [p[i] for p in points] for i, c in enumerate(columns)})


def front_table(table: pd.DataFrame, reward: str, cost: str = "fid_real") -> pd.DataFrame:
    """Per front (the `front` column, with_fronts): its points, its Pareto front and its dominated hypervolume, all
    against one reference point (the worst cost and the worst reward over every set, references included)."""
    reference = (float(table[cost].max()) * 1.05, float(table[f"{reward}_mean"].min()))
    rows = []
    for method, group in table[~is_reference(table["method"])].groupby("front"):
        points = list(zip(group[cost], group[f"{reward}_mean"], strict=True))
        rows.append(
            {
                "reward": reward,
                "method": method,
                "points": len(points),
                "front": [points[i] for i in pareto_front(points)],
                "hypervolume": hypervolume(points, reference),
            }
        )
    return pd.DataFrame(rows)


def plot_front(table: pd.DataFrame, fronts: pd.DataFrame, reward: str, path: Path, cost: str = "fid_real") -> None:
    """Reward against FID: every set as a point, each front (the `front` column) as a line, references as stars."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, group in table[~is_reference(table["method"])].groupby("front"):
        hv = float(fronts.loc[fronts["method"] == method, "hypervolume"].iloc[0])
        (line,) = ax.plot(group[cost], group[f"{reward}_mean"], "o", label=f"{method} (HV {hv:.3g})")
        front = fronts.loc[fronts["method"] == method, "front"].iloc[0]
        ax.plot([c for c, _ in front], [r for _, r in front], "-", color=line.get_color())
        for _, row in group.iterrows():
            ax.annotate(f"{row['strength']:g}", (row[cost], row[f"{reward}_mean"]), fontsize=7)
    for _, row in table[is_reference(table["method"])].iterrows():
        ax.plot(row[cost], row[f"{reward}_mean"], "*", markersize=12, label=row["method"])
    ax.set_xlabel(f"{cost} (lower is better)")
    ax.set_ylabel(f"{reward} (higher is better)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def thumbnails(images: Tensor, cell: int = THUMBNAIL) -> Tensor:
    """Images larger than `cell` pixels resized (antialiased) to `cell`, so that grids of 1024 px samples stay small."""
    if images.shape[-1] <= cell:
        return images
    return F.interpolate(images, size=(cell, cell), mode="bilinear", antialias=True).clamp(0, 1)


def spread_rows(prompts: list[str], columns: int) -> list[int]:
    """Rows of up to `columns` distinct prompts spread evenly over a sample set (each prompt's first row), so that a
    sorted prompt set shows all its kinds (every shape of the toy world), not just its first few prompts."""
    firsts = sorted({p: i for i, p in reversed(list(enumerate(prompts)))}.values())
    picks = torch.linspace(0, len(firsts) - 1, min(columns, len(firsts))).round().long()
    return [firsts[i] for i in picks.tolist()]


def grid_figure(sample_dirs: list[Path], path: Path, columns: int = 12) -> None:
    """Rows = sample sets, columns = the same prompt and seed in each (`spread_rows` of the first set's prompts);
    prompts under the columns."""
    images, index, labels, rows = [], None, [], None
    for folder in sample_dirs:
        run = read_run_params(folder)
        labels.append(f"{run['method']} {run['setting']}")
        frame, pictures = load_images(folder)
        index = frame if index is None else index
        rows = spread_rows(index["prompt"].tolist(), columns) if rows is None else rows
        images.append(thumbnails(pictures[rows]))
    assert index is not None and rows is not None  # sample_dirs is never empty (the CLI requires --samples)
    columns = len(rows)
    scale = max(1, 64 // images[0].shape[-1])  # small toy images drawn at 64 px
    grid = image_grid(torch.cat(images), nrow=columns, scale=scale)
    fig, ax = plt.subplots(figsize=(columns * 0.9 + 2, len(sample_dirs) * 0.9 + 1))
    ax.imshow(grid)
    ax.set_yticks([(i + 0.5) * grid.height / len(labels) for i in range(len(labels))], labels, fontsize=7)
    ax.set_xticks([(j + 0.5) * grid.width / columns for j in range(columns)])
    prompts = [textwrap.shorten(index["prompt"][r], 60, placeholder="...") for r in rows]
    ax.set_xticklabels([textwrap.fill(p, 20) for p in prompts], fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def matched_reward(
    table: pd.DataFrame, rewards: list[str], folder: Path, costs: tuple[str, ...] = ("fid_real", "fid_teacher")
) -> str:
    """Per reward, folder/matched_<reward>.{csv,png}: the aligned fronts' fidelity (a table with_fronts; each of
    `costs` the table has:
    FID to real renders, FID to the teacher's samples) at matched reward over seeds (didr/evaluation/matched.py);
    returns matched.md, whose gains are over the one-step warm start when it is scored."""
    references = {cost: float(table[cost].max()) * 1.05 for cost in costs if cost in table}  # front_table's point
    warm = table[table["method"] == "one-step (warm start)"]
    sections = []
    for reward in rewards:
        baseline = float(warm[f"{reward}_mean"].iloc[0]) if len(warm) else None
        sections.append(write_matched(table[~is_reference(table["method"])], reward, folder, references, baseline))
    return "# Fronts at matched reward\n\n" + "\n".join(sections)


def run_report(
    score_dirs: list[Path], sample_dirs: list[Path], rewards: list[str], out: Path, run_dirs: Sequence[Path] = ()
) -> None:
    """out/metrics.{parquet,csv,json}, out/fronts.csv, out/pareto_<reward>.png, out/matched_<reward>.{csv,png} and
    out/matched.md (fronts at matched reward), out/grid.png; with the align runs'
    folders, their training curves: out/curves_<method>.png, out/curves/<metric>.csv and out/curves.md (captions).
    Snapshot sets (align.evaluate_at) are left out of all these and make out/over_training_<reward>.{csv,png} and
    out/over_training.md: reward and fidelity against step (didr/evaluation/over_training.py)."""
    scored = with_sample_records(collect(score_dirs), sample_dirs)
    final = scored["step"].isna()
    table = with_fronts(scored[final].drop(columns=["step", "final_step"]).reset_index(drop=True))
    snapshots = set(scored.loc[~final, "sample_dir"])
    final_dirs = [folder for folder in sample_dirs if str(folder) not in snapshots]
    for folder in run_dirs:
        if not (folder / "metrics.parquet").is_file():
            raise StageInputError(f"--runs {folder}: no metrics.parquet (run `didr align` first)")
    with atomic_dir(out) as tmp:
        table.to_parquet(tmp / "metrics.parquet")
        table.to_csv(tmp / "metrics.csv", index=False)
        keyed = {f"{r['method']}/{r['setting']}": {k: v for k, v in r.items() if isinstance(v, int | float)}
                 for r in table.to_dict("records")}  # fmt: skip
        write_text_atomic(tmp / "metrics.json", json.dumps(keyed, indent=1))
        fronts = pd.concat([front_table(table, reward) for reward in rewards], ignore_index=True)
        fronts.assign(front=fronts["front"].astype(str)).to_csv(tmp / "fronts.csv", index=False)
        for reward in rewards:
            plot_front(table, fronts[fronts["reward"] == reward], reward, tmp / f"pareto_{reward}.png")
        grid_figure(final_dirs, tmp / "grid.png")
        write_text_atomic(tmp / "matched.md", matched_reward(table, rewards, tmp))
        figures = write_curves(list(run_dirs), tmp)
        if figures:
            captions = "".join(f"![{name}]({name})\n\n{text}\n\n" for name, text in figures)
            write_text_atomic(tmp / "curves.md", f"# Training curves\n\n{captions}")
        over_training = write_over_training(scored, rewards, tmp)
        if over_training:
            captions = "".join(f"![{name}]({name})\n\n{text}\n\n" for name, text in over_training)
            write_text_atomic(tmp / "over_training.md", f"# Reward and fidelity over training\n\n{captions}")
