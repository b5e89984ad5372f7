"""The processes of one training run: one per device when started by torchrun (through accelerate), else one.

Data parallelism is accelerate's DistributedDataParallel over torch.distributed. A run's numbers do not depend on how
many processes share it: every process draws the whole global batch from the same seeded SlicedGenerator and keeps
its own piece (didr/diffusion.py), gradients are averaged over processes and micro-batches, and every decision that
ends or changes the run (a stop signal, a non-finite loss) is all-reduced so that all processes take it at the same
step (docs/pipeline.md, "many GPUs").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from didr.training.preemption import PREEMPTED_EXIT_CODE

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a collective nobody answers fails after this instead of hanging
RENDEZVOUS_PORT = 29500
LOCKS_HELD = "DIDR_LOCKS_HELD"  # set for the processes a launching `didr` started: it holds the output's locks


def launched_world_size() -> int:
    """The number of processes torchrun (or srun + torchrun) started for this run: WORLD_SIZE, 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Processes:
    """This process's place in the run (`rank` of `world`) and its device; `accelerator` when world > 1."""

    device: torch.device
    rank: int = 0
    world: int = 1
    accelerator: Any = None

    @property
    def main(self) -> bool:
        """Whether this process writes the run's logs, checkpoints and outputs."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` for a backward pass whose gradients are averaged over the processes (DDP when world > 1)."""
        if self.accelerator is None:
            return module
        return self.accelerator.prepare_model(module, device_placement=False)

    @contextlib.contextmanager
    def accumulating(self, wrapped: nn.Module, sync: bool) -> Iterator[None]:
        """Backward passes inside add to the gradients without averaging them over processes unless `sync` (the
        last micro-batch of a step)."""
        if sync or self.accelerator is None:
            yield
        else:
            with self.accelerator.no_sync(wrapped):
                yield

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (every process gets the same numbers)."""
        if self.world == 1 or not values:
            return values
        keys = list(values)  # the same order on every process: the same code made them
        total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return {k: v / self.world for k, v in zip(keys, total.tolist(), strict=True)}

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def start_processes(device: str = "auto") -> Processes:
    """This process's Processes. Under torchrun (WORLD_SIZE > 1) the process group is joined through accelerate on
    gloo for the CPU ("cpu", or "auto" with no GPU) and nccl on this process's GPU; otherwise one process on `device`
    ("auto": CUDA when available)."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if launched_world_size() == 1:
        return Processes(torch.device("cuda" if cuda and device == "auto" else ("cpu" if device == "auto" else device)))
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(cpu=not cuda, kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    return Processes(accelerator.device, accelerator.process_index, accelerator.num_processes, accelerator)


def check_batch(batch_size: int, world: int, accumulation: int, key: str = "align.batch_size") -> int:
    """The micro-batch each process computes at a time: `batch_size` / (world x accumulation), which must divide."""
    if world < 1 or accumulation < 1:
        raise ValueError(f"--processes and --accumulation must be >= 1, got {world} and {accumulation}")
    if batch_size % (world * accumulation):
        raise ValueError(
            f"{key} {batch_size} does not split over {world} processes x {accumulation} micro-batches (accumulation)"
        )
    return batch_size // (world * accumulation)


def torchrun_command(argv: list[str], processes: int, env: Mapping[str, str] = os.environ) -> list[str]:
    """The command that runs `didr <argv>` as `processes` processes: torchrun --standalone on one node; in a SLURM
    allocation of several nodes, srun starts one torchrun per node and they meet at the first node (c10d)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    didr = ["-m", "didr.cli", *argv]
    nodes = int(env.get("SLURM_JOB_NUM_NODES", "1"))
    if nodes == 1:
        return [*torchrun, "--standalone", f"--nproc_per_node={processes}", *didr]
    if processes % nodes:
        raise ValueError(f"--processes {processes} does not split over the SLURM job's {nodes} nodes")
    listed = subprocess.run(
        ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    )
    head = listed.stdout.split()[0]
    return [
        "srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", *torchrun, f"--nnodes={nodes}",
        f"--nproc_per_node={processes // nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={head}:{RENDEZVOUS_PORT}",
        f"--rdzv_id={env.get('SLURM_JOB_ID', 'didr')}", *didr,
    ]  # fmt: skip


def run_processes(argv: list[str], processes: int) -> int:
    """Run `didr <argv>` as `processes` processes and wait for them. SIGTERM, SIGUSR1 or SIGINT received meanwhile
    is passed on to the training processes themselves (torchrun's children), which checkpoint at the same step and
    stop; the exit code is then 75 (PREEMPTED_EXIT_CODE), else torchrun's."""
    launcher = subprocess.Popen(torchrun_command(argv, processes), env=os.environ | {LOCKS_HELD: "1"})
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        for pid in _children(launcher.pid) or [launcher.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = launcher.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return PREEMPTED_EXIT_CODE if received else code


def _children(pid: int) -> list[int]:
    """The process ids of `pid`'s children (Linux /proc)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
