"""The default embedded run, timed stage by stage: teacher, warm-up, a grid of alignment runs, sampling, scoring,
report (issue 3's 15-minute target on 2 CPU cores). It calls the same `didr <stage>` commands a Snakemake rule runs.

Run: python benchmarks/embedded_run.py --out runs/embedded [--grid didr=0.03,0.01 ...] [--results benchmarks/RESULTS.md]
A stage whose output folder exists is reused (delete it to redo it); the report is always rebuilt.
With --results, the stage times are appended to that file with the machine and the date.
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

DEFAULT_GRID = ["didr=0.03,0.01", "dipp=3,10", "dmd2=10,30"]


def stage(args: list[str], out: Path, timings: dict[str, float], label: str) -> None:
    """Run `didr <args> --out out` unless it finished before; record the seconds it took.

    Stages write their folder atomically, so an existing folder is a finished one, except for align, whose folder
    holds checkpoints while it runs: it is finished once its generator is written, and otherwise resumes."""
    if (out / "generator.safetensors").exists() if label == "align" else out.exists():
        print(f"reuse {out}", flush=True)
        return
    start = time.perf_counter()
    subprocess.run(["didr", *args, "--out", str(out)], check=True)
    timings[label] = timings.get(label, 0.0) + time.perf_counter() - start
    print(f"{label}: {out} in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/embedded"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--grid", nargs="+", default=DEFAULT_GRID, help="method=strength,strength ...")
    parser.add_argument("--results", type=Path, help="append the stage times to this file (benchmarks/RESULTS.md)")
    args = parser.parse_args()
    out, p = args.out, ["--params", args.params]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    teacher, warmup = out / "teacher", out / "warmup"
    stage(["teacher", *p], teacher, timings, "teacher")
    stage(["warmup", *p, "--teacher", str(teacher), "--quiet"], warmup, timings, "warmup")
    runs = {"teacher": None, "warm-start": warmup}
    for item in args.grid:
        method, strengths = item.split("=")
        for strength in strengths.split(","):
            run = out / "align" / f"method={method}" / f"strength={strength}" / "seed=0"
            stage(["align", *p, "--teacher", str(teacher), "--warmup", str(warmup), "--method", method,
                   "--strength", strength, "--quiet"], run, timings, "align")  # fmt: skip
            runs[f"{method}-{strength}"] = run
    for name, generator in runs.items():
        extra = [] if generator is None else ["--generator", str(generator)]
        stage(["sample", *p, "--teacher", str(teacher), *extra, "--quiet"], out / "samples" / name, timings, "sample")
    reference = str(out / "samples" / "teacher")
    for name in runs:
        stage(["score", *p, "--teacher", str(teacher), "--samples", str(out / "samples" / name),
               "--reference", reference, "--quiet"], out / "scores" / name, timings, "score")  # fmt: skip
    report = out / "report"
    shutil.rmtree(report, ignore_errors=True)  # the report depends on the whole grid: always rebuilt
    stage(["report", *p, "--scores", *[str(out / "scores" / n) for n in runs],
           "--samples", *[str(out / "samples" / n) for n in runs]], report, timings, "report")  # fmt: skip
    total = time.perf_counter() - start
    line = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    text = (
        f"## Embedded run, {datetime.date.today()}\n\nMachine: {platform.machine()}, {os.cpu_count()} cores. "
        f"Grid {' '.join(args.grid)} (+ teacher and warm-start references). Stages run now: {line}; "
        f"total {total:.0f} s ({total / 60:.1f} min).\n\n"
    )
    print(text)
    if args.results is not None:
        old = args.results.read_text() if args.results.exists() else "# Benchmark results\n\n"
        args.results.write_text(old + text)


if __name__ == "__main__":
    main()
