"""A real single-node SLURM cluster on localhost (Debian's Slurm + munge, no systemd, no accounting, one fake GPU)
for the tests that submit jobs. A test module uses the session fixture by importing it:

    from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (pytest finds it as `slurm_cluster`)

    def test_x(slurm_cluster): ...  # slurm_cluster.partition, slurm_cluster.jobs(name), slurm_cluster.cancel(name)

A running cluster is reused, and one started here is left running for the next session (and for concurrent sessions
that reuse it). SLURM is installed with apt-get only where asked: DIDR_REQUIRE_SLURM=1 (CI, .ci/run) or
DIDR_INSTALL_SLURM=1. When no cluster can be brought up (SLURM not installed and not asked to install it, not root,
no apt-get, a daemon that does not start) the test is skipped with the reason, or fails when DIDR_REQUIRE_SLURM=1."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
CONF = Path("/etc/slurm/slurm.conf")  # the plugin's job step drops SLURM_CONF, so only the default path works
RUN = Path("/run/slurm")
LOGS = Path("/var/log/slurm")
PARTITION = "debug"
# The pipeline's largest request (threads: 2, mem_mb=8000). Nothing enforces memory here (no cgroups), so a smaller
# machine declares this much instead of leaving those jobs unschedulable.
MIN_CPUS, MIN_MEMORY_MB = 2, 8192
SLURM_CONF = """\
# Written by tests/slurm_cluster.py: a single-node test cluster without cgroups or accounting.
ClusterName=didr-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
MinJobAge=600
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd.pid
SlurmctldLogFile={logs}/slurmctld.log
SlurmdLogFile={logs}/slurmd.log
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:1 State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class ClusterUnavailable(Exception):
    """The cluster cannot be brought up here; the message says why."""


@dataclass(frozen=True)
class SlurmCluster:
    """The running cluster as the tests see it."""

    partition: str
    node: str
    user: str = getpass.getuser()

    def jobs(self, name: str | None = None) -> dict[str, str]:
        """id -> state of this user's jobs that squeue lists (ended ones for MinJobAge), optionally of one job name."""
        command = ["squeue", "--noheader", "--states=all", f"--user={self.user}", "--format=%i %T"]
        if name is not None:
            command.append(f"--name={name}")
        out = _run(command, timeout=30).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def cancel(self, name: str) -> None:
        """Cancel this user's jobs of that name."""
        _run(["scancel", f"--user={self.user}", f"--name={name}"], timeout=30)


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout; ClusterUnavailable with its output when it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ClusterUnavailable(f"{' '.join(command)}: {error}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ClusterUnavailable(f"{' '.join(command)} exited {done.returncode}: {' | '.join(tail)}")
    return done


def _works(command: list[str], **kwargs) -> bool:
    """Whether a command succeeds within 10 s."""
    try:
        _run(command, timeout=10, **kwargs)
    except ClusterUnavailable:
        return False
    return True


def _install() -> None:
    """The Debian packages, when a daemon or client is missing and installing was asked for (apt lists refreshed only
    if the install fails)."""
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(tool)]
    if not missing:
        return
    if "1" not in (os.environ.get("DIDR_REQUIRE_SLURM"), os.environ.get("DIDR_INSTALL_SLURM")):
        raise ClusterUnavailable(
            f"SLURM is not installed ({', '.join(missing)} not found); DIDR_INSTALL_SLURM=1 installs it with apt-get"
            " (as root)"
        )
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    try:
        _run(install, timeout=600, env=env)
    except ClusterUnavailable:
        _run(["apt-get", "update", "-q"], timeout=300, env=env)
        _run(install, timeout=600, env=env)


def _node_size() -> tuple[int, int]:
    """This machine's CPUs and memory (MiB) as slurmd sees them, raised to the pipeline's needs."""
    line = _run(["slurmd", "-C"], timeout=30).stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in line.split())
    return max(int(fields["CPUs"]), MIN_CPUS), max(int(fields["RealMemory"]), MIN_MEMORY_MB)


def _controller_up() -> bool:
    """Whether a slurmctld answers."""
    try:
        return "is UP" in _run(["scontrol", "ping"], timeout=10).stdout
    except ClusterUnavailable:
        return False


def _start_munge() -> None:
    """munged as user munge, with a key, unless a credential already round-trips."""
    if _works(["sh", "-c", "munge -n | unmunge"]):
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run(["mungekey", "--create", f"--keyfile={key}"], timeout=30)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    for folder in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    _run(["runuser", "-u", "munge", "--", "munged"], timeout=30)
    _wait(lambda: _works(["sh", "-c", "munge -n | unmunge"]), 10, "munged does not answer")


def _wait(ready, seconds: float, message: str) -> None:
    """Poll `ready()` every half second; ClusterUnavailable(message) after `seconds`."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise ClusterUnavailable(message)
        time.sleep(0.5)


def _log_tail(name: str) -> str:
    """The last lines of a daemon's log, for an error message."""
    log = LOGS / name
    return " | ".join(log.read_text().splitlines()[-3:]) if log.exists() else f"no {log}"


def _node_ready(node: str) -> bool:
    """Whether the node takes jobs; a drained or down node (a stale state) is resumed."""
    states = _run(["sinfo", "--noheader", "--Node", f"--nodes={node}", "--format=%T"], timeout=10).stdout.split()
    state = states[0] if states else "unknown"
    if state in ("idle", "mixed", "allocated"):  # a trailing * would mean: not responding
        return True
    if "drain" in state or "down" in state:
        _works(["scontrol", "update", f"NodeName={node}", "State=RESUME"])
    return False


def start_cluster() -> SlurmCluster:
    """The running cluster, or a new one brought up here (installed first when needed and asked for)."""
    node = socket.gethostname().split(".")[0]
    if _controller_up():
        _wait(lambda: _node_ready(node), 60, f"node {node} of the running cluster does not take jobs")
        default = [p for p in _run(["sinfo", "--noheader", "--format=%P"], timeout=10).stdout.split() if "*" in p]
        return SlurmCluster(partition=default[0].rstrip("*") if default else PARTITION, node=node)
    _install()
    if os.geteuid() != 0:
        raise ClusterUnavailable("no SLURM controller answers and starting one needs root")
    _start_munge()
    cpus, memory = _node_size()
    for folder in (CONF.parent, RUN, LOGS, Path("/var/lib/slurm/slurmctld"), Path("/var/lib/slurm/slurmd")):
        folder.mkdir(parents=True, exist_ok=True)
    CONF.write_text(SLURM_CONF.format(node=node, cpus=cpus, memory=memory, partition=PARTITION, run=RUN, logs=LOGS))
    (CONF.parent / "gres.conf").write_text("Name=gpu File=/dev/null\n")  # a fake GPU; without a File it drains
    _run(["slurmctld", "-c"], timeout=30)  # -c: no job state from an earlier cluster
    _wait(_controller_up, 30, f"slurmctld does not answer: {_log_tail('slurmctld.log')}")
    _run(["slurmd"], timeout=30)
    _wait(lambda: _node_ready(node), 60, f"node {node} does not take jobs: {_log_tail('slurmd.log')}")
    return SlurmCluster(partition=PARTITION, node=node)


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> SlurmCluster:
    """The localhost SLURM cluster; skips (or fails under DIDR_REQUIRE_SLURM=1) when it cannot be brought up."""
    try:
        return start_cluster()
    except ClusterUnavailable as error:
        if os.environ.get("DIDR_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM cluster required (DIDR_REQUIRE_SLURM=1) but unavailable: {error}", pytrace=False)
        pytest.skip(f"no SLURM cluster: {error}")
