"""Where each stage's output lives, one function per stage, shared by the Snakemake rules, the DVC stages and the
launcher so the three always agree: runs/<experiment>/<stage>/..., reports/<experiment>/."""

from __future__ import annotations

from pathlib import Path

REFERENCES = ("teacher", "warm-start")  # sample sets besides the grid: teacher with N steps and CFG, the warm start


def runs_dir(experiment: str) -> Path:
    return Path("runs") / experiment


def teacher_dir(experiment: str) -> Path:
    return runs_dir(experiment) / "teacher"


def warmup_dir(experiment: str) -> Path:
    return runs_dir(experiment) / "warmup"


def align_dir(experiment: str, run_id: str) -> Path:
    return runs_dir(experiment) / "align" / run_id


def checkpoints_dir(experiment: str, run_id: str) -> Path:
    """Outside the align output, so a retried job resumes instead of starting over."""
    return runs_dir(experiment) / "checkpoints" / run_id


def snapshot_dir(experiment: str, run_id: str, step: int) -> Path:
    """A run's EMA generator at `step` (align.evaluate_at), inside the run's align output."""
    return align_dir(experiment, run_id) / "snapshots" / f"step={step}"


def snapshot_set(run_id: str, step: int) -> str:
    """The sample set of a run's generator at `step`: step=<N>/<run id>, so that its folders sit beside the run's
    final set's (samples/<run id>), not inside them."""
    return f"step={step}/{run_id}"


def parse_snapshot_set(sample_set: str) -> tuple[str, int] | None:
    """(run id, step) of a snapshot set; None for a reference or a run's final set."""
    head, _, run_id = sample_set.partition("/")
    if not (head.startswith("step=") and head[5:].isdigit() and run_id):
        return None
    return run_id, int(head[5:])


def generator_dir(experiment: str, sample_set: str) -> Path | None:
    """The one-step generator behind a sample set: none for the teacher, the warm start, an align run, or a run's
    snapshot."""
    if sample_set == "teacher":
        return None
    snapshot = parse_snapshot_set(sample_set)
    if snapshot is not None:
        return snapshot_dir(experiment, *snapshot)
    return warmup_dir(experiment) if sample_set == "warm-start" else align_dir(experiment, sample_set)


def samples_dir(experiment: str, sample_set: str) -> Path:
    return runs_dir(experiment) / "samples" / sample_set


def scores_dir(experiment: str, sample_set: str) -> Path:
    return runs_dir(experiment) / "scores" / sample_set


def report_dir(experiment: str) -> Path:
    return Path("reports") / experiment


def export_dir(experiment: str, run_id: str) -> Path:
    """An align run as a diffusers pipeline folder (`didr export`)."""
    return runs_dir(experiment) / "export" / run_id


def log_file(experiment: str, stage: str, name: str | None = None) -> Path:
    return Path("logs") / experiment / (f"{stage}.log" if name is None else f"{stage}/{name}.log")


def benchmark_file(experiment: str, stage: str, name: str | None = None) -> Path:
    """Snakemake's per-job measurements (seconds, peak memory) of a stage."""
    return Path("logs") / experiment / "benchmarks" / (f"{stage}.tsv" if name is None else f"{stage}/{name}.tsv")
