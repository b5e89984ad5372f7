"""Per-stage time and peak memory of a finished pipeline run, from the files Snakemake's `benchmark:` directive
writes (logs/<experiment>/benchmarks/), as a markdown section with the machine and the date.

Run: python benchmarks/pipeline_times.py --experiment embedded [--results benchmarks/RESULTS.md]
`make demo` runs it after the DAG; with --results the section is appended to that file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import pandas as pd

STAGES = ("teacher", "warmup", "align", "sample", "score", "report", "export")


def stage_table(experiment: str) -> pd.DataFrame:
    """One row per stage: jobs, seconds (sum over its jobs), the slowest job, the largest peak RSS."""
    root = Path("logs") / experiment / "benchmarks"
    rows = []
    for stage in STAGES:
        files = sorted([root / f"{stage}.tsv", *(root / stage).rglob("*.tsv")])
        frames = [pd.read_csv(f, sep="\t") for f in files if f.is_file()]
        if not frames:
            continue
        jobs = pd.concat(frames)
        rows.append({"stage": stage, "jobs": len(jobs), "seconds": jobs["s"].sum(), "slowest job s": jobs["s"].max(),
                     "peak RSS MiB": jobs["max_rss"].max()})  # fmt: skip
    if not rows:
        raise SystemExit(f"{root}: no benchmark files (run the pipeline first)")
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="embedded")
    parser.add_argument("--results", type=Path, help="append the section to this file (benchmarks/RESULTS.md)")
    args = parser.parse_args()
    table = stage_table(args.experiment)
    total = table["seconds"].sum()
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in table.itertuples(index=False)]  # fmt: skip
    text = (
        f"## Pipeline run `{args.experiment}`, {datetime.date.today()}\n\nMachine: {platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.platform()}. Seconds per stage summed over its jobs (Snakemake "
        f"benchmark files); total {total:.0f} s ({total / 60:.1f} min).\n\n" + "\n".join(lines) + "\n\n"
    )
    print(text)
    if args.results is not None:
        old = args.results.read_text() if args.results.exists() else "# Benchmark results\n\n"
        args.results.write_text(old + text)


if __name__ == "__main__":
    main()
