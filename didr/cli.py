"""The `didr` command: one sub-command per job, each a thin parse and call."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename, so no half-written file is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def demo(args: argparse.Namespace) -> int:
    """The closed-form study: where each method lands against the exact tilted Gaussian, and how fast."""
    import torch

    from didr.closed_form_study import METHODS, markdown_table, run_one

    torch.set_num_threads(1)
    grid = [
        (schedule, method, beta, t_max)
        for schedule in args.schedules
        for t_max in args.t_max
        for beta in args.betas
        for method in METHODS
    ]
    rows = []
    for i, (schedule, method, beta, t_max) in enumerate(grid, 1):
        row = run_one(schedule, method, beta, t_max, steps=args.steps, seed=args.seed)
        rows.append(row)
        print(
            f"[{i}/{len(grid)}] {schedule} t<={t_max} beta={beta} {method}: "
            f"mean err {row.mean_error:.3f}, cov err {row.cov_error:.3f} ({row.seconds:.1f} s)",
            flush=True,
        )
    table = markdown_table(rows)
    print("\n" + table)
    params = {
        "steps": args.steps,
        "seed": args.seed,
        "schedules": args.schedules,
        "betas": args.betas,
        "t_max": args.t_max,
    }
    _write_atomically(args.out, f"# Closed-form study\n\nParameters: `{json.dumps(params)}`\n\n{table}\n")
    _write_atomically(
        args.out.with_suffix(".json"), json.dumps({"params": params, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    print(f"\nwrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="didr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    study = commands.add_parser("demo", help="closed-form study of DIDR, its proxies and DI++ (prints a table)")
    study.add_argument("--steps", type=int, default=1200, help="generator steps per run")
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--schedules", nargs="+", default=["vp-cosine", "flow"], choices=["vp-cosine", "flow"])
    study.add_argument("--betas", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    study.add_argument("--t-max", nargs="+", type=float, default=[0.98, 0.6])
    study.add_argument("--out", type=Path, default=Path("reports/closed_form_study.md"))
    study.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"didr {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
