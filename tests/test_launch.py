"""`didr launch`: the stages and an align sweep run through submitit (local processes, and sbatch on the localhost
SLURM cluster) with the Snakemake rules' exact commands and paths; a preempted run is resubmitted and resumes; bad
input fails in one line before anything is submitted."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_project import TINY, scratch_project, snakemake
from slurm_cluster import slurm_cluster_fixture  # noqa: F401 (the `slurm_cluster` fixture)

from didr.config import load_params
from didr.launch import STAGES, stage_tasks

pytestmark = pytest.mark.integration  # `didr launch` runs the stages in subprocesses and through sbatch

GRID = ["method=didr/beta=0.5/seed=0", "method=dipp/alpha=2/seed=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per job: two cores are shared by the jobs and the tests
ENV.pop("DIDR_SLURM_PARTITION", None)


def launch(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`didr launch ARGS` in the project folder, as a user runs it."""
    command = [sys.executable, "-m", "didr.cli", "launch", *args]
    return subprocess.run(command, cwd=project, env=env or ENV, capture_output=True, text=True, timeout=900)


@contextmanager
def launching(project: Path, *args: str, env: dict | None = None):
    """`didr launch ARGS` running in the background until the block ends: yields it and its first job's id."""
    command = [sys.executable, "-m", "didr.cli", "launch", *args]
    process = subprocess.Popen(
        command, cwd=project, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = next((line for line in process.stdout if line.startswith("submitted job ")), "")
        assert line, process.communicate()
        yield process, line.split()[2].rstrip(":")
    finally:
        process.kill()  # nothing when it has ended
        process.wait()


@pytest.fixture
def slurm(slurm_cluster):
    """The localhost SLURM cluster; launcher jobs that a failing test leaves behind are cancelled."""
    yield slurm_cluster
    slurm_cluster.cancel("didr-align")


def submitted(stdout: str) -> dict[str, str]:
    """The launcher's submission lines: job id -> the shell command it printed."""
    return dict(re.findall(r"^submitted job (\S+): (.*)$", stdout, flags=re.M))


def snakemake_dry_run(project: Path, *args: str) -> str:
    """The output of a Snakemake dry run of the project's workflow."""
    done = snakemake(project, "--dry-run", "--cores", "2", *args, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def params_file(project: Path, name: str, seeds: list[int], methods: dict, **align) -> str:
    """A copy of the tiny params with another grid (another seed keeps its runs apart) and align settings."""
    params = yaml.safe_load((TINY / "tiny_params.yaml").read_text())
    params["grid"] = {"seeds": seeds, "methods": methods}
    params["align"].update(align)
    (project / name).write_text(yaml.safe_dump(params))
    return name


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A scratch project whose teacher and warm start were made by `didr launch teacher` / `warmup` (local)."""
    folder = scratch_project(tmp_path_factory.mktemp("launch") / "project")
    started = time.monotonic()
    stages = {stage: launch(folder, stage, "--executor", "local") for stage in ("teacher", "warmup")}
    print(f"launch teacher + warmup: {time.monotonic() - started:.1f} s")
    return folder, stages


def test_teacher_and_warmup_run_the_rule_commands(project):
    folder, stages = project
    for stage, done in stages.items():
        assert done.returncode == 0, done.stdout + done.stderr
        [command] = submitted(done.stdout).values()
        assert command.startswith(f"didr {stage} --params params.yaml ")
        assert command.endswith(f" --out runs/tiny/{stage} > logs/tiny/{stage}.log 2>&1")
        assert re.search(rf"^\[1/1\] {stage}: COMPLETED in [\d.]+ s \(job \d+\)$", done.stdout, flags=re.M)
        assert (folder / "logs" / "tiny" / f"{stage}.log").is_file()
    assert (folder / "runs/tiny/teacher/pipeline/model_index.json").is_file()
    assert (folder / "runs/tiny/warmup/generator.safetensors").is_file()


def test_align_sweep_matches_the_snakemake_rules_and_is_not_rerun(project):
    folder, _ = project
    started = time.monotonic()
    done = launch(folder, "align", "--executor", "local")
    print(f"launch align (2 runs): {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    commands = sorted(submitted(done.stdout).values())
    assert len(commands) == 2
    for run in GRID:
        out = folder / "runs/tiny/align" / run
        record = json.loads((out / "params.json").read_text())
        assert (record["run"], record["seed"]) == (run, 0)
        assert record["method"] == run.split("/")[0].removeprefix("method=")
        assert (out / "generator.safetensors").is_file()
        assert list((folder / "runs/tiny/checkpoints" / run).glob("*/step-*.safetensors"))
        assert (folder / "logs/tiny/align" / f"{run}.log").is_file()
        assert re.search(rf"^\[\d/2\] {re.escape(run)}: COMPLETED in [\d.]+ s", done.stdout, flags=re.M)
        assert re.search(rf"^\d+ +COMPLETED +[\d.]+  {re.escape(run)}$", done.stdout, flags=re.M)  # the summary

    # Every stage's launcher command is the one its Snakemake rule runs (a forced dry run prints them all), and
    # Snakemake takes the launcher's align outputs as up to date.
    dry_run = snakemake_dry_run(folder, "-p", "--forcerun", "teacher")
    printed = re.findall(r"^Shell command: exec (didr .*)$", dry_run, re.M)  # jobs.shell execs `didr`
    rules = sorted(
        " ".join(command.split()) for command in printed
    )  # the sample rule leaves two spaces for no generator
    params = load_params(folder / "params.yaml")
    tasks = [task for stage in STAGES for task in stage_tasks(params, Path("params.yaml"), stage, [])]
    assert rules == sorted(f"{shlex.join(task.command)} > {task.log} 2>&1" for task in tasks)
    [sharded] = stage_tasks(params, Path("params.yaml"), "warmup", [], processes=2, strategy="fsdp")
    assert "--processes 2 --accumulation 1 --strategy fsdp" in shlex.join(sharded.command)
    assert set(commands) <= set(rules) and len(rules) == 1 + 1 + 2 + 4 + 4 + 1 + 2  # ... report, an export per run
    up_to_date = snakemake_dry_run(
        folder, "--rerun-triggers", "mtime", "--", *(f"runs/tiny/align/{run}" for run in GRID)
    )
    assert "Nothing to be done" in up_to_date

    jobs = sorted((folder / "logs/tiny/submitit").iterdir())
    again = launch(folder, "align", "--executor", "local")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "didr launch align: nothing to submit, all 2 outputs exist"
    assert sorted((folder / "logs/tiny/submitit").iterdir()) == jobs


def test_preempted_align_is_resubmitted_once_and_resumes(project):
    folder, _ = project
    params = params_file(folder, "slow.yaml", [1], {"didr": {"beta": [0.5]}}, steps=40, checkpoint_every=2)
    run = "method=didr/beta=0.5/seed=1"
    started = time.monotonic()
    with launching(folder, "align", "--executor", "local", "--params", params) as (process, first):
        checkpoints = folder / "runs/tiny/checkpoints" / run
        while not list(checkpoints.glob("*/step-*.safetensors")) and time.monotonic() - started < 600:
            time.sleep(0.1)
        os.kill(int(first), signal.SIGTERM)  # the local job's controller passes it on, as SLURM's preemption does
        out, err = process.communicate(timeout=600)
    print(f"preempted align run (40 steps): {time.monotonic() - started:.1f} s")
    assert process.returncode == 0, out + err
    assert f"preempted: {run} (job {first}, exit 75); resubmitting" in out
    [second] = [job for job in submitted(out) if job != first]
    assert re.search(rf"^{first},{second} +COMPLETED +[\d.]+  {re.escape(run)}$", out, flags=re.M)
    log = (folder / "logs/tiny/align" / f"{run}.log").read_text()
    _, _, after = log.partition("didr align: preempted, preempted by SIGUSR1 after ")
    assert after, log  # the first job's output is kept: the resubmission appends
    stopped = int(after.split()[0])
    assert 0 < stopped < 40
    assert re.search(rf"align: +\d+%\|[^|]*\| {stopped}/40", after)  # the second job's bar starts where it stopped
    steps = pd.read_parquet(folder / "runs/tiny/align" / run / "metrics.parquet")["step"].tolist()
    assert steps == list(range(40))  # resumed: no step lost or repeated


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--executor", "local", "--runs", "method=didr/beta=9/seed=0"], "'method=didr/beta=9/seed=0' is not a run of"),
        (["--executor", "slurm"], "no SLURM partition: pass --partition or set DIDR_SLURM_PARTITION"),
        (["--executor", "local"], "missing input runs/tiny/warmup (the warmup stage's output)"),
        (["--executor", "local", "--strategy", "zero3"], "--strategy: unknown value 'zero3'"),
        (["--executor", "local", "--strategy", "fsdp"], "--strategy fsdp needs --processes > 1"),
    ],
    ids=["unknown-run", "no-partition", "no-warmup", "unknown-strategy", "fsdp-alone"],
)
def test_bad_input_fails_in_one_line_and_submits_nothing(tmp_path, args, message):
    folder = scratch_project(tmp_path / "project")
    (folder / "runs/tiny/teacher").mkdir(parents=True)  # a teacher, but no warm start
    done = launch(folder, "align", *args)
    assert done.returncode == 2
    assert done.stderr.startswith("didr launch: ") and message in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stdout == ""
    assert not (folder / "logs").exists()


def test_align_sweep_through_sbatch(project, slurm):
    folder, _ = project
    params = params_file(folder, "sbatch.yaml", [2], {"didr": {"beta": [0.5]}, "dipp": {"alpha": [2]}})
    runs = ["method=didr/beta=0.5/seed=2", "method=dipp/alpha=2/seed=2"]
    env = {**ENV, "DIDR_SLURM_PARTITION": slurm.partition}
    started = time.monotonic()
    done = launch(folder, "align", "--executor", "slurm", "--params", params, "--time-min", "10", env=env)
    print(f"launch align through sbatch (2 runs): {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = submitted(done.stdout)
    assert len(jobs) == 2 and all(job.isdigit() for job in jobs)
    assert {job: slurm.jobs("didr-align").get(job) for job in jobs} == dict.fromkeys(jobs, "COMPLETED")
    for run in runs:
        record = json.loads((folder / "runs/tiny/align" / run / "params.json").read_text())
        assert (record["run"], record["seed"]) == (run, 2)
        assert re.search(rf"^\d+ +COMPLETED +[\d.]+  {re.escape(run)}$", done.stdout, flags=re.M)
    assert "sacct" not in done.stderr  # job states came from result files and squeue, not from sacct


def test_job_killed_without_a_result_is_reported_not_awaited(project, slurm):
    folder, _ = project
    params = params_file(folder, "killed.yaml", [4], {"didr": {"beta": [0.5]}}, steps=400, checkpoint_every=2)
    run = "method=didr/beta=0.5/seed=4"
    env = {**ENV, "DIDR_SLURM_PARTITION": slurm.partition}
    started = time.monotonic()
    with launching(folder, "align", "--executor", "slurm", "--params", params, env=env) as (process, job):
        while not list((folder / "runs/tiny/checkpoints" / run).glob("*/step-*")) and time.monotonic() - started < 300:
            time.sleep(0.2)
        # SIGKILL the job's processes, as an out-of-memory killer would: no result file, and sacct cannot tell.
        child = subprocess.run(
            ["pgrep", "-f", f"checkpoints runs/tiny/checkpoints/{run} "], capture_output=True, text=True, check=True
        ).stdout.split()
        parent = Path(f"/proc/{child[0]}/stat").read_text().rsplit(")", 1)[1].split()[1]
        for pid in (parent, *child):
            os.kill(int(pid), signal.SIGKILL)
        out, err = process.communicate(timeout=300)
    print(f"killed job reported after {time.monotonic() - started:.1f} s")
    assert process.returncode == 1, out + err
    assert slurm.jobs("didr-align")[job] == "FAILED"
    assert re.search(rf"^\[1/1\] {re.escape(run)}: FAILED, no result \(job {job}\)$", out, flags=re.M), out
    assert f"{run}: FAILED, no result; log logs/tiny/align/{run}.log; job " in err
    assert not (folder / "runs/tiny/align" / run).exists()
