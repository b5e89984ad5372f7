"""The pipeline on a real SLURM cluster through the repo's profile, typed as a user would: `snakemake --profile slurm
all` in a scratch copy of the project with the tiny params."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pipeline_project import scratch_project
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.integration  # the tiny DAG on the localhost SLURM cluster

COMMAND = ["snakemake", "--profile", "slurm", "all"]
LOCAL_RULES = {"report", "all"}
# The tiny DAG: about 1.5 min with `--cores 2`; on SLURM 3 min on an idle 2-core machine (each job starts Snakemake
# twice, about 8 s) and 6 min when other work shares the cores.
DAG_TIMEOUT_S = 900


def snakemake_slurm(project: Path, cluster: SlurmCluster, partition: str | None, timeout: float, *options: str):
    """`snakemake --profile slurm all [options]` in `project`; on timeout its process group is killed, its jobs
    cancelled."""
    process = subprocess.Popen(
        [*COMMAND, *options],
        cwd=project,
        env=slurm_environment(partition),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        for name in run_ids(err):
            cluster.cancel(name)
        pytest.fail(f"{' '.join(COMMAND)} still ran after {timeout} s:\n{err[-3000:]}")
    return process.returncode, out + err


def slurm_environment(partition: str | None) -> dict[str, str]:
    """This environment without DIDR_SLURM_* and SNAKEMAKE_* settings, the venv's snakemake and didr first on PATH, and
    DIDR_SLURM_PARTITION set to `partition` (unset when None)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DIDR_SLURM_", "SNAKEMAKE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env if partition is None else {**env, "DIDR_SLURM_PARTITION": partition}


def run_ids(log: str) -> list[str]:
    """The plugin's run id, the SLURM job name of all the jobs it submits."""
    return re.findall(r"SLURM run ID: (\S+)", log)


def test_pipeline_runs_on_slurm(slurm_cluster: SlurmCluster, tmp_path):
    """Every non-local job of the tiny DAG goes through sbatch and completes on the cluster; the report is written.
    The warm-up and each align run are 2 processes (torchrun on the CPU, gloo) inside their SLURM job."""
    project = scratch_project(tmp_path / "project")
    two = ["--set-resources", "warmup:processes=2", "align:processes=2"]
    code, log = snakemake_slurm(project, slurm_cluster, slurm_cluster.partition, DAG_TIMEOUT_S, *two)
    assert code == 0, log[-5000:]
    for name in ("metrics.csv", "grid.png"):
        assert (project / "reports" / "tiny" / name).stat().st_size > 0
    trained = [project / "runs" / "tiny" / "warmup", *(project / "runs" / "tiny" / "align").glob("*/*/*")]
    assert len(trained) == 3
    for folder in trained:
        assert json.loads((folder / "params.json").read_text())["processes"] == 2

    planned = {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", log, re.MULTILINE) if rule != "total"}
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", log)
    assert Counter(rule for _, rule in submitted) == {r: n for r, n in planned.items() if r not in LOCAL_RULES}
    assert len(submitted) == 14  # the tiny DAG's 16 jobs (2 exports) but report and all

    (run_id,) = run_ids(log)
    assert slurm_cluster.jobs(run_id) == {job: "COMPLETED" for job, _ in submitted}
    slurm_logs = {path.stem for path in (project / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert {job for job, _ in submitted} <= slurm_logs


def test_missing_partition_stops_before_submitting(slurm_cluster: SlurmCluster, tmp_path):
    """Without DIDR_SLURM_PARTITION the run stops within seconds with one line naming the key and the profile."""
    project = scratch_project(tmp_path / "project")
    start = time.monotonic()
    code, log = snakemake_slurm(project, slurm_cluster, None, timeout=120)
    assert code != 0
    assert time.monotonic() - start < 30, "the partition check must come before any job is submitted"
    lines = [line for line in log.splitlines() if "slurm_partition" in line and "slurm/config.yaml" in line]
    assert len(lines) == 1, log[-3000:]
    assert "submitted with SLURM jobid" not in log
    (run_id,) = run_ids(log)
    assert slurm_cluster.jobs(run_id) == {}
    assert not (project / "runs").exists()
