"""The multi-node launch: in a SLURM allocation of several nodes `didr align --processes N` runs srun with one
torchrun agent per node, meeting at the first node through a c10d rendezvous. Here the two "nodes" are two agents
on this host, started from the shipped command (torchrun_command) without its leading srun words, as srun would
start them; the run equals one process on the whole batch. On the localhost SLURM cluster (tests/slurm_cluster.py) a
real srun of 2 tasks carries a stop signal from the launching `didr` to both ranks."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from slurm_cluster import slurm_cluster_fixture  # noqa: F401  (pytest finds it as `slurm_cluster`)
from test_distributed import LOG_TOLERANCE, WEIGHT_TOLERANCE

from didr.training.checkpoint import PREEMPTED_EXIT_CODE
from didr.training.distributed import RENDEZVOUS_PORT, SHUTDOWN_SECONDS, torchrun_command


def fake_scontrol(folder: Path, hosts: list[str]) -> dict[str, str]:
    """An environment whose PATH starts with a `scontrol` that lists `hosts` (as `scontrol show hostnames` would)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(hosts) + "\n")
    script.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_several_nodes_make_an_srun_of_one_agent_per_node(tmp_path):
    """4 processes on 2 nodes: srun with one task per node, each a torchrun agent of 2 workers, all meeting at the
    first host of the node list on the job's rendezvous; processes that do not split over the nodes stop."""
    slurm = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    env = fake_scontrol(tmp_path, ["gpu07", "gpu08"]) | slurm
    command = torchrun_command(["align", "--processes", "4"], 4, env)
    assert command[:4] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert command[4:7] == [sys.executable, "-m", "torch.distributed.run"]
    assert f"--shutdown-timeout={SHUTDOWN_SECONDS}" in command and "--signals-to-handle" in " ".join(command)
    assert "SIGUSR1" in next(w for w in command if w.startswith("--signals-to-handle"))
    for word in ("--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_id=4242"):
        assert word in command
    assert f"--rdzv_endpoint=gpu07:{RENDEZVOUS_PORT}" in command
    assert "--rdzv_endpoint=gpu07:29555" in torchrun_command(["align"], 4, env | {"MASTER_PORT": "29555"})
    assert command[-5:] == ["-m", "didr.cli", "align", "--processes", "4"]
    standalone = torchrun_command(["align"], 2, {"SLURM_JOB_NUM_NODES": "1"})
    assert "--standalone" in standalone and "--nproc_per_node=2" in standalone and "srun" not in standalone
    with pytest.raises(ValueError, match=r"--processes 3 does not split over the SLURM job's 2 nodes"):
        torchrun_command(["align"], 3, env)
    no_scontrol = {"PATH": str(tmp_path / "empty")} | slurm
    with pytest.raises(ValueError, match=r"SLURM_JOB_NODELIST 'gpu\[07-08\]': scontrol show hostnames failed"):
        torchrun_command(["align"], 4, no_scontrol)


@pytest.fixture(scope="module")
def toy_align(tiny_teacher, tmp_path_factory) -> list[str]:
    """`didr align` of test_distributed's toy-world LoRA run (from a warm-up made here), without --out."""
    from didr.cli import main

    params = ["--params", str(tiny_teacher.parent / "params.yaml"), "--teacher", str(tiny_teacher), "--quiet"]
    params += ["--set", "finetune.lora_rank=2"]
    warmup = tmp_path_factory.mktemp("multinode") / "warmup"
    assert main(["warmup", *params, "--out", str(warmup)]) == 0
    return ["align", *params, "--warmup", str(warmup), "--method", "didr", "--strength", "0.5"]


def agent_words(argv: list[str], folder: Path) -> tuple[list[str], list[str]]:
    """The shipped command of `didr <argv> --processes 2` in an allocation of 2 nodes (this host, twice), split
    into its srun words and the torchrun agent that srun starts on each node."""
    slurm = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": f"didr-{os.getpid()}"}
    env = fake_scontrol(folder / "bin", ["127.0.0.1", "127.0.0.2"]) | slurm | {"MASTER_PORT": str(free_port())}
    command = torchrun_command([*argv, "--processes", "2"], 2, env)
    agent = command.index(sys.executable)
    return command[:agent], command[agent:]


AGENT_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.integration
def test_two_node_rendezvous_equals_one_process(toy_align, tmp_path):
    """`didr align --processes 2` in a 2-node allocation: the two torchrun agents of its srun command (--nnodes=2,
    --nproc_per_node=1, c10d on the first node), started as two separate processes on this host, run the toy-world
    LoRA align of test_distributed (2 steps of 2 samples); its EMA generator, fake score and metric log equal one
    process with 2 micro-batches of the same batch."""
    from didr.cli import main

    align = [*toy_align, "--set", "align.steps=2", "--set", "align.batch_size=2"]  # short: a 2-step run shows it
    assert main([*align, "--accumulation", "2", "--out", str(tmp_path / "one")]) == 0
    srun, agent = agent_words([*align, "--out", str(tmp_path / "two")], tmp_path)
    assert srun == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    agents = [
        subprocess.Popen(agent, env=os.environ | AGENT_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [a.communicate(timeout=240)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert json.loads((tmp_path / "two" / "params.json").read_text())["processes"] == 2  # one world of both agents
    for part in ("generator.safetensors", "fake.safetensors"):
        one, two = load_file(tmp_path / "one" / part), load_file(tmp_path / "two" / part)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=WEIGHT_TOLERANCE, msg=f"{part} {key}")
    logs = [pd.read_parquet(tmp_path / n / "metrics.parquet").drop(columns="step_seconds") for n in ("one", "two")]
    pd.testing.assert_frame_equal(logs[1], logs[0], rtol=LOG_TOLERANCE)


@pytest.mark.integration
def test_a_signal_to_the_launcher_checkpoints_both_srun_tasks(slurm_cluster, toy_align, tmp_path):
    """The launching `didr` of a multi-node run (supervise of the srun command) gets SIGTERM after the first
    checkpoint; its srun (here 2 tasks on the localhost cluster's one node, each a torchrun agent of the shipped
    command) gets SIGUSR1 and passes it on: both ranks checkpoint at the same step and the launcher exits 75.
    (SIGTERM itself makes srun kill its tasks at once: "forcing job termination", no checkpoint.)"""
    checkpoints = tmp_path / "checkpoints"
    argv = [*toy_align, "--set", "align.steps=40", "--checkpoints", str(checkpoints), "--out", str(tmp_path / "out")]
    _, agent = agent_words(argv, tmp_path)
    srun = ["srun", f"--partition={slurm_cluster.partition}", "--job-name=didr-multinode-test", "--nodes=1"]
    srun += ["--ntasks=2", "--cpus-per-task=1"]
    code = f"import sys; from didr.training.distributed import supervise; sys.exit(supervise({[*srun, *agent]!r}))"
    launcher = subprocess.Popen(
        [sys.executable, "-c", code], env=os.environ | AGENT_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list(checkpoints.rglob("step-*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=240)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            slurm_cluster.cancel("didr-multinode-test")
    stops = re.findall(r"preempted by SIGUSR1 after (\d+) steps", output)
    assert launcher.returncode == PREEMPTED_EXIT_CODE and len(stops) == 2 and stops[0] == stops[1], output[-3000:]
    assert "forcing job termination" not in output
    assert list(checkpoints.rglob(f"step-{int(stops[0]):06d}.safetensors"))
