"""The `didr` command: one sub-command per job, each a thin parse and call."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any


def demo(args: argparse.Namespace) -> int:
    """The closed-form study: where each method lands against the exact tilted Gaussian, and how fast."""
    import torch

    from didr.closed_form_study import METHODS, markdown_table, run_one
    from didr.stages.io import write_text_atomic

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
    write_text_atomic(args.out, f"# Closed-form study\n\nParameters: `{json.dumps(params)}`\n\n{table}\n")
    write_text_atomic(
        args.out.with_suffix(".json"), json.dumps({"params": params, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    print(f"\nwrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def torch_threads(given: int | None) -> int:
    """The threads a job may use: `--threads` (a rule's {threads}), else SLURM_CPUS_PER_TASK, else the CPU affinity."""
    if given is not None:
        if given < 1:
            raise ValueError(f"--threads: must be >= 1, got {given}")
        return given
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm:
        if not slurm.isdigit() or int(slurm) < 1:
            raise ValueError(f"SLURM_CPUS_PER_TASK: expected a positive integer, got {slurm!r}")
        return int(slurm)
    return len(os.sched_getaffinity(0))


def _load_params(args: argparse.Namespace) -> Any:
    """The params file with the --set overrides; one-line ConfigError for a folder or a value that is not YAML."""
    import yaml

    from didr.config import ConfigError, load_params

    if args.params.is_dir():
        raise ConfigError(f"{args.params}: is a folder, not a params file (--params)")
    for item in args.set:
        try:
            yaml.safe_load(item.partition("=")[2])
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(error).splitlines()[0]})") from None
    return load_params(args.params, args.set)


def _stage(args: argparse.Namespace) -> int:
    """Run one pipeline stage with the params file; each stage writes its outputs atomically. Before any work: the
    threads are set, the params checked, the output path checked and locked (and the align run's checkpoints)."""
    import torch

    from didr.training.distributed import launched_world_size

    processes = getattr(args, "processes", 1)
    launching = processes > 1 and launched_world_size() == 1  # this process starts the run's processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the processes of this node share the job's threads
    threads = max(1, torch_threads(args.threads) // local)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _checked_stage(args, processes, launching)
    finally:
        torch.set_num_threads(previous)  # a stage called from Python leaves the caller's setting as it was


def _checked_stage(args: argparse.Namespace, processes: int, launching: bool) -> int:
    """The stage after its threads are set: params, output and batch checks, locks, then the work."""
    from contextlib import ExitStack

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from didr.training.atomic import check_output_folder
    from didr.training.distributed import LOCKS_HELD, check_batch, check_strategy, launched_world_size, run_processes
    from didr.training.lock import hold_lock

    transformers_logging.disable_progress_bar()  # the stages show their own progress; keep stderr for errors
    diffusers_logging.disable_progress_bar()
    params = _load_params(args)
    if args.command in ("warmup", "align"):  # the batch splits over the processes and micro-batches, checked here
        section = params.warmup if args.command == "warmup" else params.align
        world = processes if launching else launched_world_size()
        check_batch(section.batch_size, world, args.accumulation, key=f"{args.command}.batch_size")
        check_strategy(args.strategy, world, args.accumulation)
    check_output_folder(args.out)
    if args.command == "align":
        args.checkpoints = args.checkpoints or args.out.with_name(args.out.name + ".checkpoints")
    locked = not os.environ.get(LOCKS_HELD) and os.environ.get("RANK", "0") == "0"  # else its launcher holds them
    with ExitStack() as locks:
        for target in ([args.out] + ([args.checkpoints] if args.command == "align" else [])) * locked:
            try:
                locks.enter_context(hold_lock(target))
            except OSError as error:  # EACCES, EROFS: the lock file is the stage's first write
                raise ValueError(f"--out {args.out}: cannot write in {target.parent} ({error.strerror})") from None
        return run_processes(args.argv, processes) if launching else _run_stage(args, params)


def _run_stage(args: argparse.Namespace, params: Any) -> int:
    """The stage's own work (its inputs are read here: after the output is checked and locked)."""
    if args.command == "teacher":
        from didr.stages.teacher import run_teacher

        run_teacher(params, args.out, progress=not args.quiet)
    elif args.command == "warmup":
        from didr.stages.warmup import run_warmup

        run_warmup(
            params, args.teacher, args.out, device=args.device, progress=not args.quiet,
            accumulation=args.accumulation, strategy=args.strategy,
        )  # fmt: skip
    elif args.command == "align":
        from didr.grid import Run, parse_value
        from didr.stages.align import run_align

        overrides = [item.removeprefix("align.").partition("=") for item in args.set if item.startswith("align.")]
        seed = params.seed if args.seed is None else args.seed
        run = Run(args.method, args.strength, seed, tuple((k, parse_value(v)) for k, _, v in overrides))
        run_align(
            params, args.teacher, args.warmup, args.out, run, args.checkpoints, args.device, not args.quiet,
            accumulation=args.accumulation, strategy=args.strategy,
        )  # fmt: skip
    elif args.command == "sample":
        from didr.stages.sample import run_sample

        run_sample(params, args.teacher, args.out, generator_dir=args.generator, device=args.device)
    elif args.command == "score":
        from didr.stages.score import run_score

        run_score(params, args.teacher, args.samples, args.reference, args.out, device=args.device)
    elif args.command == "export":
        from didr.stages.export import run_export

        run_export(params, args.teacher, args.run_dir, args.scores, args.out)
    else:
        from didr.stages.report import run_report

        run_report(args.scores, args.samples, params.rewards.eval, args.out, args.runs)
    return 0


def reference(args: argparse.Namespace) -> int:
    """Features of a folder (or list file) of real images, for score.reference (FID / KID against real data)."""
    from didr.evaluation.inception import load_inception
    from didr.evaluation.reference import build_reference, save_reference
    from didr.stages.common import pick_device

    model = load_inception(args.inception, pick_device(args.device))
    built = build_reference(args.images, model, args.size, args.batch_size)
    save_reference(built, args.out)
    print(f"wrote {args.out}: {len(built.features)} images at {args.size} px, {built.extractor}")
    return 0


def launch(args: argparse.Namespace) -> int:
    """Submit one stage, or a sweep of align runs, through submitit and wait for it (didr/launch.py)."""
    from didr.launch import launch as launch_stage

    return launch_stage(args)


def build_parser() -> argparse.ArgumentParser:
    from didr.methods import METHODS, strength_axes

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

    def stage(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--params", type=Path, default=Path("params.yaml"), help="experiment parameters (YAML)")
        sub.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
        sub.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda:0', ...")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        sub.add_argument("--threads", type=int, help="torch threads (default: SLURM_CPUS_PER_TASK, else the CPUs)")
        sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one params value (repeatable), e.g. --set align.drs_t_max=0.9")  # fmt: skip
        sub.set_defaults(run=_stage)
        return sub

    stage("teacher", "train / cache the teacher, the toy rewards and the prompt embeddings")
    warmup = stage("warmup", "initialise the generator at t* and warm the fake score up on its samples")
    warmup.add_argument("--teacher", type=Path, required=True)
    align = stage("align", "one alignment run (resumes from its latest checkpoint)")
    align.add_argument("--teacher", type=Path, required=True)
    for sub in (warmup, align):
        sub.add_argument("--processes", type=int, default=1,
                         help="processes of the run, one per GPU (torchrun; docs/pipeline.md)")  # fmt: skip
        sub.add_argument("--accumulation", type=int, default=1,
                         help="micro-batches per process and step: the batch is the same, the memory less")  # fmt: skip
        sub.add_argument("--strategy", default="ddp",
                         help="ddp: each process holds the networks; fsdp: the trained ones are sharded over the "
                              "processes (FSDP2); fsdp-teacher: the teacher too (docs/pipeline.md)")  # fmt: skip
    align.add_argument("--warmup", type=Path, required=True)
    align.add_argument("--method", required=True, metavar="{" + ",".join(METHODS) + "}",
                       help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()))  # fmt: skip
    align.add_argument("--strength", type=float, default=0.0, help="the method's strength: " + strength_axes())
    align.add_argument("--seed", type=int, help="the run's seed (default: the params file's seed)")
    align.add_argument("--checkpoints", type=Path, help="checkpoint folder (default: <out>.checkpoints)")
    sample = stage("sample", "evaluation images from a one-step generator, or the teacher with N steps and CFG")
    sample.add_argument("--teacher", type=Path, required=True)
    sample.add_argument("--generator", type=Path, help="a warmup or align output; omit for the teacher reference")
    score = stage("score", "per-image rewards and per-set fidelity of one sample set")
    score.add_argument("--teacher", type=Path, required=True)
    score.add_argument("--samples", type=Path, required=True)
    score.add_argument("--reference", type=Path, required=True, help="the teacher's sample set")
    report = stage("report", "metrics table, Pareto plots with hypervolumes, image grids")
    report.add_argument("--scores", type=Path, nargs="+", required=True)
    report.add_argument("--samples", type=Path, nargs="+", required=True, help="sample sets shown in the grid")
    report.add_argument("--runs", type=Path, nargs="*", default=[], help="align runs whose training curves to draw")
    export = stage("export", "an align run as a diffusers pipeline folder with a model card (docs/export.md)")
    export.add_argument("--teacher", type=Path, required=True)
    export.add_argument("--run", dest="run_dir", metavar="RUN", type=Path, required=True, help="an align output")
    export.add_argument("--scores", type=Path, required=True, help="the run's score output (the card's metrics)")
    ref = commands.add_parser("reference", help="Inception features of real images (score.reference)")
    ref.add_argument("--images", type=Path, required=True, help="a folder of images, or a file listing them")
    ref.add_argument("--inception", type=Path, required=True, help="FID Inception weights (pt_inception-2015-12-05)")
    ref.add_argument("--size", type=int, required=True, help="centre-crop and resize to this side (the samples')")
    ref.add_argument("--out", type=Path, required=True, help="the features file (safetensors), written atomically")
    ref.add_argument("--batch-size", type=int, default=50)
    ref.add_argument("--device", default="auto")
    ref.set_defaults(run=reference)
    from didr.launch import add_launch_parser

    add_launch_parser(commands).set_defaults(run=launch)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and run a command. A stage command stops on SIGTERM / SIGUSR1 / SIGINT at any moment with exit 75 and one
    line (inside training after a checkpoint, as Preempted); bad input is one line and exit 2."""
    from didr.training.preemption import PREEMPTED_EXIT_CODE, Interrupted, raise_on_signals

    command = next(iter(sys.argv[1:] if argv is None else argv), "")  # named even if stopped while parsing
    try:
        with raise_on_signals():  # from the start: parsing imports torch, which takes seconds
            args = build_parser().parse_args(argv)
            args.argv = sys.argv[1:] if argv is None else argv  # as given: a launching process passes it on
            if args.run is _stage:
                return _run(args)
        return _run(args)
    except Interrupted as stop:
        print(f"didr {command}: {stop} before its output was written; rerun the same command", file=sys.stderr)
        return PREEMPTED_EXIT_CODE


def _run(args: argparse.Namespace) -> int:
    from didr.training.checkpoint import PREEMPTED_EXIT_CODE, Preempted
    from didr.training.lock import LockedError
    from didr.training.preemption import raise_if_interrupted

    try:
        return int(args.run(args))
    except (Preempted, LockedError) as stop:
        print(f"didr {args.command}: {'preempted, ' if isinstance(stop, Preempted) else ''}{stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (ValueError, FloatingPointError, OSError) as error:  # OSError names its file (disk full, permissions)
        raise_if_interrupted()  # the error may be a signal's, disguised by the library it interrupted
        print(f"didr {args.command}: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def program() -> None:
    """The `didr` program: main(), then exit with its status. Once main has returned, whatever it did is whole, and
    stop signals are ignored: in the interpreter's teardown (torch's exit hooks take a fraction of a second) Python's
    defaults would turn a finished command into death by the signal (exit -2 or -15) or a traceback."""
    import signal

    from didr.training.preemption import SIGNALS

    code = main()
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    program()
