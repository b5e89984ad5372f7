"""A time limit that comes mid-run on the localhost SLURM cluster, through the repo's profile (integration tier): one
align job of `snakemake --profile slurm`, whose time limit the test shortens once it trains, so that the profile's
early signal (`--signal=TERM@<lead>`) is due at once. `didr` gets it inside the plugin's job step, checkpoints and
exits 75; Snakemake inside the step waits for it; the job fails, Snakemake's retry resumes from the checkpoint, and
the run ends bit-identical to an uninterrupted one, every step in its metric log exactly once."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_project import scratch_project
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401
from test_faults import assert_same_outputs
from test_slurm import run_ids, slurm_environment

from didr import jobs
from didr.cli import main
from didr.config import load_params

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[1]
STEPS = 250  # 0.2 s each on an idle 2-core machine: training outlasts SLURM's next check (every 30 s)
TIMEOUT_S = 900  # the whole test: about 3 min on an idle 2-core machine


def early_signal_lead() -> int:
    """The seconds before the time limit at which the profile asks SLURM for SIGTERM (to the job's steps: no `B:`)."""
    text = (ROOT / "slurm" / "config.yaml").read_text()
    (lead,) = re.findall(r"^  slurm_extra: \"'--signal=TERM@(\d+)'\"$", text, re.MULTILINE)
    return int(lead)


@pytest.fixture
def project(tiny_teacher, tmp_path, monkeypatch):
    """A scratch project with one align run of STEPS steps, its teacher (the session's) and warm start made."""
    params = yaml.safe_load((tiny_teacher.parent / "params.yaml").read_text())
    params["align"] |= {"steps": STEPS, "checkpoint_every": 50}
    params["grid"] = {"seeds": [0], "methods": {"didr": {"beta": [0.5]}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    folder = scratch_project(tmp_path / "project", tmp_path / "params.yaml")
    (job,) = jobs.jobs(load_params(folder / "params.yaml"), "align")
    shutil.copytree(tiny_teacher, folder / job.input["teacher"], copy_function=shutil.copy)
    monkeypatch.chdir(folder)
    common = ["--params", "params.yaml", "--threads", "1", "--quiet", "--teacher", job.input["teacher"]]
    assert main(["warmup", *common, "--out", job.input["warmup"]]) == 0
    return folder, job


def uninterrupted(folder: Path, job: jobs.Job) -> subprocess.Popen:
    """The job's own command (one thread, as the test's SLURM job) with another output and checkpoint folder, its
    output and errors in uninterrupted.log."""
    words = job.command("params.yaml", threads=1)
    for option, value in (("--out", "uninterrupted"), ("--checkpoints", "uninterrupted-checkpoints")):
        words[words.index(option) + 1] = value
    with (folder / "uninterrupted.log").open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "didr.cli", *words[1:]], cwd=folder, stdout=log, stderr=log)


def wait_for(find, timeout: float, what: str):
    """Poll `find()` every half second until it returns something; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while (found := find()) is None:
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.5)
    return found


def run_seconds(job_id: str) -> int:
    """How long a SLURM job has been running (scontrol's RunTime, [D-]HH:MM:SS)."""
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    days, _, clock = re.search(r"RunTime=(\S+)", text).group(1).rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def test_a_time_limit_mid_run_is_resumed_by_the_retry(slurm_cluster: SlurmCluster, project):
    folder, job = project
    started = time.monotonic()
    reference = uninterrupted(folder, job)
    log_path = folder.parent / "snakemake.log"
    with log_path.open("w") as log_file:
        snakemake = subprocess.Popen(
            ["snakemake", job.output, "--profile", "slurm", "--set-threads", "align=1", "--rerun-triggers", "mtime"],
            cwd=folder, env=slurm_environment(slurm_cluster.partition), stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    didr_log = folder / job.log
    try:
        first = wait_for(lambda: re.search(r"submitted with SLURM jobid (\d+)", log_path.read_text()), 300, "job")[1]
        progress = rf"\b([1-9]\d*)/{STEPS} \["
        wait_for(lambda: re.search(progress, didr_log.read_text()) if didr_log.is_file() else None, 300, "step")
        # The time limit `lead` s (rounded down to a minute) from now: SLURM's next check sends the early signal.
        limit_minutes = (run_seconds(first) + early_signal_lead()) // 60
        subprocess.run(["scontrol", "update", f"JobId={first}", f"TimeLimit={limit_minutes}"], check=True)
        code = snakemake.wait(timeout=TIMEOUT_S - (time.monotonic() - started))
    except BaseException:
        os.killpg(snakemake.pid, signal.SIGKILL)
        reference.kill()
        for name in run_ids(log_path.read_text()):
            slurm_cluster.cancel(name)
        raise
    log = log_path.read_text()
    assert code == 0, log[-5000:]
    assert reference.wait(timeout=TIMEOUT_S) == 0, (folder / "uninterrupted.log").read_text()[-3000:]
    print(f"time limit, retry and the uninterrupted run: {time.monotonic() - started:.0f} s")

    submitted = re.findall(r"submitted with SLURM jobid (\d+)", log)
    assert len(submitted) == 2 and submitted[0] == first, f"not one retry (STEPS too few?):\n{log[-5000:]}"
    (run_id,) = run_ids(log)
    assert slurm_cluster.jobs(run_id) == {first: "FAILED", submitted[1]: "COMPLETED"}
    (first_log,) = (folder / ".snakemake" / "slurm_logs").rglob(f"{first}.log")
    step_log = first_log.read_text()
    # Snakemake inside the job step waited for `didr`, which exited 75 (not the shell dying of the signal).
    assert "returned non-zero exit status 75" in step_log and "died with" not in step_log, step_log[-3000:]

    first_line = re.search(rf"\b(\d+)/{STEPS} \[", didr_log.read_text())  # the retry's first progress line
    assert first_line and 0 < int(first_line[1]) < STEPS, didr_log.read_text()[-2000:]
    out = folder / job.output
    assert pd.read_parquet(out / "metrics.parquet")["step"].tolist() == list(range(STEPS))
    assert_same_outputs(folder / "uninterrupted", out)
