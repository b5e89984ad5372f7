"""`didr launch`: one pipeline stage, or a sweep of align runs, submitted through submitit to SLURM or to local
processes, without Snakemake. Each job runs the same `didr <stage>` command as the stage's Snakemake rule, with the
same inputs, output, log paths and default resources (all from didr/jobs.py), so outputs made either way are
interchangeable.

Job states never come from submitit: it reads them from `sacct`, which fails on clusters without accounting; then it
logs a warning at every poll, calls every job UNKNOWN and waits forever for a job that died without writing its
result (time limit, out of memory, scancel). Here a job is finished when its result file exists (the job's own
return value or exception), or when `squeue --states=all` no longer shows it pending or running and no result came
within RESULT_GRACE_S; its state is then the last one squeue showed (TIMEOUT, OUT_OF_MEMORY, CANCELLED, ...).
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from didr import jobs, layout

STAGES = tuple(jobs.STAGES)
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
ENDED |= {"SPECIAL_EXIT", "TIMEOUT"}  # squeue states of a job that no longer runs
RESULT_GRACE_S = 15  # how long a job out of the queue may take to show its result file (submitit waits as long)
SQUEUE_EVERY_S = 10
PREEMPTED_EXIT_CODE = 75  # didr.training.checkpoint's; not imported, so the launcher does not load torch


@dataclass(frozen=True)
class Task:
    """One job: its name (a run id, a sample set or the stage), its `didr` command, its output and its log."""

    name: str
    command: list[str]
    done: Path  # exists once the stage's output is complete (outputs are written atomically)
    log: Path
    inputs: list[tuple[Path, str]]  # (path, what it is) that must exist before the job is submitted


WHAT = {  # what a job's input is, by its name in the job table (didr/jobs.py)
    "train": "prompts.train",
    "eval": "prompts.eval",
    "teacher": "the teacher stage's output",
    "warmup": "the warmup stage's output",
    "generator": "the generator of {name}",
    "samples": "the samples of {name}",
    "reference": "the teacher's samples",
    "run": "the align run {name}",
    "scores": "the scores of {name}",
}
WHAT_EACH = {  # an input of several paths
    "scores": "a score stage's output",
    "samples": "a sample stage's output",
    "runs": "an align stage's output",
}


def stage_tasks(
    params: Any,
    params_file: Path,
    stage: str,
    names: list[str],
    processes: int | None = None,
    accumulation: int | None = None,
    threads: int | None = None,
    strategy: str | None = None,
) -> list[Task]:
    """Every job of `stage` (one per name; every run or sample set when `names` is empty), each with the command of
    its Snakemake rule (both from didr/jobs.py), with `processes`, `accumulation` and `strategy` per run for warmup
    and align and `threads` (--cpus) for every stage when given;
    ValueError names a run or sample set that is not in the grid."""
    known = jobs.names(params, stage)
    if jobs.STAGES[stage].each:
        for name in names:
            if name not in known:
                sets = stage in ("sample", "score")
                what = "a sample set (teacher, warm-start or a grid run)" if sets else "a run of the grid"
                raise ValueError(f"{name!r} is not {what} of {params_file} ({len(known)} known, e.g. {known[-1]})")
    else:
        names = []
    tasks = []
    for name in dict.fromkeys(names or known):  # each once, in order
        job = jobs.job(params, stage, name)
        inputs = []
        for key, value in job.input.items():
            if isinstance(value, list):
                inputs += [(Path(path), WHAT_EACH[key]) for path in value]
            elif value:
                inputs.append((Path(value), WHAT[key].format(name=name)))
        command = job.command(str(params_file), processes, accumulation, threads, strategy)
        tasks.append(Task(name, command, Path(job.done), Path(job.log), inputs))
    return tasks


def run_logged(command: list[str], log: str, cwd: str, append: bool) -> tuple[int, float]:
    """Inside a job: run the `didr` command in `cwd` with its output in `log`, as the rule's `> log 2>&1` does, and
    return its exit code and seconds. Any signal the scheduler sends the job (SIGTERM on preemption, SIGUSR2 before
    the time limit, SIGUSR1) reaches the command as SIGUSR1, on which an align run checkpoints and exits 75; the
    command ignores SIGUSR2 (SLURM's --signal also reaches it directly, and SIGUSR2 would kill it unsaved)."""
    child: list[subprocess.Popen] = []

    def forward(signum: int, frame: object) -> None:
        for process in child:
            process.send_signal(signal.SIGUSR1)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)  # replaces submitit's handlers, which would requeue or end the job at once
    path = Path(cwd) / log
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with path.open("a" if append else "w", encoding="utf-8") as out:
        child.append(
            subprocess.Popen(
                [sys.executable, "-m", "didr.cli", *command[1:]],  # `didr` of the interpreter that launched the job
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN),
            )
        )
        code = child[0].wait()
    return code, time.monotonic() - start


@dataclass
class Submission:
    """A task's job (its first or its resubmission), what the queue last said of it, and how it ended."""

    task: Task
    job: Any
    attempts: int
    job_ids: list[str] = field(default_factory=list)  # the task's earlier jobs
    queue_state: str = "LOST"  # the last state squeue showed
    gone_since: float | None = None  # when the job was first seen out of the queue
    state: str = ""
    seconds: float | None = None


def executor_settings(args: argparse.Namespace) -> dict[str, Any]:
    """submitit's settings for `--executor` and the stage's resources; ValueError names a missing one."""
    default = jobs.STAGES[args.stage].resources
    settings: dict[str, Any] = {
        "name": f"didr-{args.stage}",
        "timeout_min": default.runtime if args.time_min is None else args.time_min,
        "gpus_per_node": default.gpus * getattr(args, "processes", 1) if args.gpus is None else args.gpus,
        "cpus_per_task": default.threads if args.cpus is None else args.cpus,
        "mem_gb": default.mem_mb / 1000 if args.mem_gb is None else args.mem_gb,
    }
    if args.executor == "slurm":
        partition = args.partition or os.environ.get("DIDR_SLURM_PARTITION")
        if not partition:
            raise ValueError("no SLURM partition: pass --partition or set DIDR_SLURM_PARTITION")
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise ValueError("executor slurm: sbatch or srun is not on PATH (not a SLURM submit host?)")
        settings["slurm_partition"] = partition
        account = args.account or os.environ.get("DIDR_SLURM_ACCOUNT")
        if account:
            settings["slurm_account"] = account
    return settings


def queue_states() -> dict[str, str] | None:
    """The state of each of this user's jobs that SLURM still shows (ended ones for MinJobAge); None when squeue
    fails."""
    command = ["squeue", "--noheader", f"--user={getpass.getuser()}", "--states=all", "--format=%i|%T"]
    found = subprocess.run(command, capture_output=True, text=True)
    if found.returncode != 0:
        return None
    return dict(line.split("|", 1) for line in found.stdout.split())


def poll(sub: Submission, slurm: bool, states: dict[str, str] | None) -> str:
    """The state of a submission's job once it ended, from its result file, else from the queue (`states`, None when
    not asked this time) after RESULT_GRACE_S without a result; "" while it runs."""
    job = sub.job
    if job.paths.result_pickle.exists():
        if job.exception() is not None:
            return "ERROR"  # the job itself raised: its trace is in submitit's stderr file
        code, sub.seconds = job.result()
        return {0: "COMPLETED", PREEMPTED_EXIT_CODE: "PREEMPTED"}.get(code, f"FAILED (exit {code})")
    if slurm and states is not None:
        sub.queue_state = states.get(job.job_id, sub.queue_state)
        gone = job.job_id not in states or sub.queue_state in ENDED
        sub.gone_since = (sub.gone_since or time.monotonic()) if gone else None
    elif not slurm and job.done():
        sub.queue_state, sub.gone_since = "ENDED", sub.gone_since or time.monotonic()
    if sub.gone_since is not None and time.monotonic() - sub.gone_since > RESULT_GRACE_S:
        return f"{sub.queue_state}, no result"
    return ""


def watch(executor: Any, tasks: list[Task], max_jobs: int, cwd: str) -> list[Submission]:
    """Submit the tasks (at most `max_jobs` at a time, 0 for no limit), print a line as each job ends, resubmit a
    preempted one once (it resumes from its checkpoints); returns every task's last submission, in ending order."""
    waiting, running, ended = list(tasks), list[Submission](), list[Submission]()
    slurm = executor.cluster == "slurm"
    last_squeue = 0.0

    def submit(task: Task, attempts: int) -> Submission:
        job = executor.submit(run_logged, task.command, str(task.log), cwd, attempts > 1)
        print(f"submitted job {job.job_id}: {shlex.join(task.command)} > {task.log} 2>&1", flush=True)
        return Submission(task, job, attempts)

    try:
        while waiting or running:
            while waiting and (max_jobs == 0 or len(running) < max_jobs):
                running.append(submit(waiting.pop(0), 1))
            time.sleep(1)
            states = None
            if slurm and time.monotonic() - last_squeue > SQUEUE_EVERY_S:
                states, last_squeue = queue_states(), time.monotonic()
            for sub in list(running):
                sub.state = poll(sub, slurm, states)
                if not sub.state:
                    continue
                running.remove(sub)
                if sub.state == "PREEMPTED" and sub.attempts == 1:
                    print(f"preempted: {sub.task.name} (job {sub.job.job_id}, exit 75); resubmitting", flush=True)
                    running.append(submit(sub.task, 2))
                    running[-1].job_ids = [sub.job.job_id]
                    continue
                ended.append(sub)
                took = "" if sub.seconds is None else f" in {sub.seconds:.1f} s"
                line = f"[{len(ended)}/{len(tasks)}] {sub.task.name}: {sub.state}{took} (job {sub.job.job_id})"
                print(line, flush=True)
    except KeyboardInterrupt:
        for sub in running:
            sub.job.cancel(check=False)
        raise ValueError(f"interrupted; cancelled {len(running)} running jobs") from None
    return ended


def launch(args: argparse.Namespace) -> int:
    """`didr launch`: check the params, the runs, the executor settings and the inputs, then submit the jobs whose
    output is missing, wait for them and summarise; 1 when a job failed, naming it and its logs."""
    import submitit

    from didr.config import load_params

    params = load_params(args.params)
    if hasattr(args, "strategy"):  # warmup and align: refused here, before any job is submitted
        from didr.training.distributed import check_strategy

        check_strategy(args.strategy, args.processes, args.accumulation)
    names = getattr(args, "runs", None) or getattr(args, "sets", [])
    tasks = stage_tasks(
        params, args.params, args.stage, names, getattr(args, "processes", None), getattr(args, "accumulation", None),
        args.cpus, getattr(args, "strategy", None),
    )  # fmt: skip
    settings = executor_settings(args)
    todo = [task for task in tasks if not task.done.exists()]
    if not todo:
        print(f"didr launch {args.stage}: nothing to submit, all {len(tasks)} outputs exist")
        return 0
    for task in todo:
        for path, what in task.inputs:
            if not path.exists():
                raise ValueError(f"missing input {path} ({what}) of {task.name}; nothing submitted")
    # One folder per launch: local job ids are process ids, which recur, and submitit takes any result file in
    # a job's folder for that job's.
    launch_name = f"{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder = layout.log_file(params.experiment, "submitit").parent / "submitit" / launch_name / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=args.executor)
    executor.update_parameters(**settings)
    max_jobs = args.max_jobs if args.max_jobs is not None else (1 if args.executor == "local" else 0)
    print(f"didr launch {args.stage}: {len(todo)} of {len(tasks)} jobs to run ({args.executor}, {folder.parent})")
    ended = watch(executor, todo, max_jobs, str(Path.cwd()))
    print(f"\n{'job':<16} {'state':<24} {'seconds':>8}  name")
    for sub in ended:
        seconds = "-" if sub.seconds is None else f"{sub.seconds:.1f}"
        jobs = ",".join([*sub.job_ids, sub.job.job_id])
        print(f"{jobs:<16} {sub.state:<24} {seconds:>8}  {sub.task.name}")
    failed = [sub for sub in ended if sub.state != "COMPLETED"]
    if not failed:
        return 0
    print(f"didr launch {args.stage}: {len(failed)} of {len(ended)} jobs failed:", file=sys.stderr)
    for sub in failed:
        print(f"  {sub.task.name}: {sub.state}; log {sub.task.log}; job {sub.job.paths.stderr}", file=sys.stderr)
    return 1


def defaults(resource: str, per: int = 1) -> str:
    """The stages' default of a resource, for the help: `1 (report 0)`, `60 (align 120; sample, score, report 30)`."""
    values: dict[float, list[str]] = {}
    for stage in jobs.STAGES.values():
        values.setdefault(getattr(stage.resources, resource) / per, []).append(stage.name)
    (first, _), *others = values.items()
    exceptions = "; ".join(f"{', '.join(names)} {value:g}" for value, names in others)
    return f"{first:g} ({exceptions})" if others else f"{first:g}"


def add_launch_parser(commands: Any) -> argparse.ArgumentParser:
    """The `didr launch <stage>` parser: executor, resources and the stage's runs or sample sets."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", type=Path, default=Path("params.yaml"), help="experiment parameters (YAML)")
    common.add_argument(
        "--executor",
        choices=["slurm", "local"],
        required=True,
        help="slurm (sbatch) or local (processes on this machine)",
    )
    common.add_argument("--partition", help="SLURM partition (default: $DIDR_SLURM_PARTITION)")
    common.add_argument("--account", help="SLURM account (default: $DIDR_SLURM_ACCOUNT, else none)")
    # Each default is the stage's, from the job table (didr/jobs.py), as its Snakemake rule asks.
    common.add_argument("--gpus", type=int, help=f"GPUs per job (default: {defaults('gpus')})")
    common.add_argument("--cpus", type=int, help=f"CPU cores per job (default: {defaults('threads')})")
    common.add_argument("--mem-gb", type=float, help=f"memory per job (default: {defaults('mem_mb', 1000)})")
    common.add_argument("--time-min", type=int, help=f"time limit per job (default: {defaults('runtime')})")
    common.add_argument("--max-jobs", type=int, help="jobs at a time (default: 1 local, no limit slurm)")
    launch_parser = commands.add_parser(
        "launch",
        help="submit a stage or an align sweep through submitit (SLURM or "
        "local) without Snakemake; waits and summarises",
    )
    stages = launch_parser.add_subparsers(dest="stage", required=True)
    for stage in STAGES:
        sub = stages.add_parser(stage, parents=[common], help=f"the {stage} stage")
        if stage in ("align", "export"):
            sub.add_argument("--runs", nargs="+", metavar="ID", help="run ids (default: every grid run)")
        if stage in ("sample", "score"):
            sub.add_argument("sets", nargs="*", help="sample sets: teacher, warm-start or run ids (default: all)")
        if stage in ("warmup", "align"):
            sub.add_argument(
                "--processes",
                type=int,
                default=1,
                help="processes per run, one per GPU (GPUs per job: this times the stage's)",
            )
            sub.add_argument("--accumulation", type=int, default=1, help="micro-batches per process and step")
            sub.add_argument("--strategy", default="ddp", help="ddp, fsdp or fsdp-teacher")
    return launch_parser
