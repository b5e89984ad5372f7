"""Wall-clock time of `make demo` from nothing (the package already installed), against issue 13's 10-minute goal.

It removes the demo's outputs (runs/embedded, logs/embedded, reports/embedded, the closed-form study, the HTML
report), runs `make demo`, and appends to benchmarks/RESULTS.md the total, the load average before the start, and
the per-stage job time of benchmarks/pipeline_times.py (summed over jobs: with jobs side by side it exceeds the
DAG's wall clock, which is measured from the first job's start to the last one's end).

Run: python benchmarks/demo_time.py [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
from pipeline_times import stage_table

EXPERIMENT = "embedded"
OUTPUTS = (
    Path("runs") / EXPERIMENT,
    Path("logs") / EXPERIMENT,
    Path("reports") / EXPERIMENT,
    Path("reports/closed_form_study.md"),
    Path("reports/closed_form_study.json"),
    Path("reports/report.html"),
    Path("logs/closed_form_study.log"),
)
GOAL_MINUTES = 10


def remove_outputs() -> None:
    for path in OUTPUTS:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def dag_wall_seconds(experiment: str) -> float:
    """From the first job's start to the last job's end: each benchmark file is written when its job ends, and
    holds the job's seconds."""
    spans = []
    for file in (Path("logs") / experiment / "benchmarks").rglob("*.tsv"):
        seconds = float(pd.read_csv(file, sep="\t")["s"].iloc[-1])
        end = file.stat().st_mtime
        spans.append((end - seconds, end))
    return max(end for _, end in spans) - min(start for start, _ in spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()
    load = os.getloadavg()
    remove_outputs()
    start = time.perf_counter()
    subprocess.run(["make", "demo"], check=True)
    total = time.perf_counter() - start
    table = stage_table(EXPERIMENT)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in table.itertuples(index=False)]  # fmt: skip
    verdict = "within" if total <= GOAL_MINUTES * 60 else "over"
    text = (
        f"## `make demo` from nothing, {datetime.date.today()}\n\nMachine: {platform.machine()}, {os.cpu_count()} "
        f"cores, {platform.platform()}; load average before the start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(1 / 5 / 15 min). The package installed; the demo's outputs removed first.\n\n"
        f"`make demo`: **{total:.0f} s ({total / 60:.1f} min)**, {verdict} the {GOAL_MINUTES}-minute goal. The DAG "
        f"{dag_wall_seconds(EXPERIMENT):.0f} s from its first job's start to its last one's end (the closed-form "
        f"study runs beside it); job time per stage, summed over its jobs:\n\n" + "\n".join(lines) + "\n\n"
    )
    print(text)
    args.results.write_text(args.results.read_text() + text)


if __name__ == "__main__":
    main()
