"""The processes of one training run: one per device when started by torchrun (through accelerate), else one.

The strategies share the processes out (docs/pipeline.md, "many GPUs"): `ddp`, accelerate's DistributedDataParallel
(every process holds the whole model), and `fsdp`, FSDP2 `fully_shard` (each process holds 1/world of every trained
network's parameters, gradients, optimiser states and EMA; a block's parameters are all-gathered for its forward and
backward, its gradients reduce-scattered); `fsdp-teacher` is fsdp with the frozen teacher sharded too (else every
process holds it whole). A run's numbers do not depend on the strategy or on how many processes
share it: every process draws the whole global batch from the same seeded SlicedGenerator and keeps its own piece
(didr/diffusion.py), gradients are averaged over processes and micro-batches, and every decision that ends or
changes the run (a stop signal, a non-finite loss) is all-reduced so that all processes take it at the same step.
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
from torch import Tensor, nn

from didr.training.preemption import PREEMPTED_EXIT_CODE

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a collective nobody answers fails after this instead of hanging
RENDEZVOUS_PORT = 29500
SHUTDOWN_SECONDS = 3600  # torchrun's wait for its workers after a stop signal, before it kills them
LOCKS_HELD = "DIDR_LOCKS_HELD"  # set for the processes a launching `didr` started: it holds the output's locks
STRATEGIES = ("ddp", "fsdp", "fsdp-teacher")  # fsdp-teacher: fsdp, and the frozen teacher sharded too


def launched_world_size() -> int:
    """The number of processes torchrun (or srun + torchrun) started for this run: WORLD_SIZE, 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Processes:
    """This process's place in the run (`rank` of `world`), its device and the strategy (STRATEGIES) that shares the
    networks out; `accelerator` when world > 1."""

    device: torch.device
    rank: int = 0
    world: int = 1
    accelerator: Any = None
    strategy: str = "ddp"

    @property
    def main(self) -> bool:
        """Whether this process writes the run's logs, checkpoints and outputs."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether checkpoints are sharded (torch.distributed.checkpoint; any fsdp run, even of one process)."""
        return self.strategy != "ddp"

    def shard(self, module: nn.Module) -> nn.Module:
        """`module`, sharded in place over the processes under fsdp with world > 1 (else as it is): FSDP2
        `fully_shard` on each block (every module of an nn.ModuleList) and then on the whole, so that one block's
        parameters at a time are gathered. Call it before making the module's optimiser."""
        if not self.sharded or self.world == 1:
            return module
        return _fully_shard(module, self.device, self.world)

    def shard_teacher(self, teacher: nn.Module) -> nn.Module:
        """The frozen `teacher`, sharded in place as `shard` does under fsdp-teacher with world > 1 (else as it is:
        every process holds it whole). Call it after making the trainable copies that share its frozen weights
        (LoRA): they keep those weights whole until `shard` shards them with their copy."""
        if self.strategy != "fsdp-teacher" or self.world == 1:
            return teacher
        return _fully_shard(teacher, self.device, self.world)

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` for a backward pass whose gradients are averaged over the processes: DDP under ddp with
        world > 1; a sharded module (`shard`) averages its own."""
        if self.accelerator is None or self.sharded:
            return module
        return self.accelerator.prepare_model(module, device_placement=False)

    @contextlib.contextmanager
    def accumulating(self, wrapped: nn.Module, sync: bool) -> Iterator[None]:
        """Backward passes inside add to the gradients without averaging them over processes unless `sync` (the
        last micro-batch of a step)."""
        if sync or self.accelerator is None:
            yield
        elif self.sharded:
            from torch.distributed.fsdp import FSDPModule

            sharded = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
            for m in sharded:
                m.set_requires_gradient_sync(False, recurse=False)
            try:
                yield
            finally:
                for m in sharded:
                    m.set_requires_gradient_sync(True, recurse=False)
        else:
            with self.accelerator.no_sync(wrapped):
                yield

    def full(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each tensor whole on every process (a sharded one gathered: call it on all processes at once)."""
        from torch.distributed.tensor import DTensor

        return {k: t.full_tensor() if isinstance(t, DTensor) else t for k, t in tensors.items()}

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


def _fully_shard(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """FSDP2 `fully_shard` of `module` in place over `world` processes: each block, innermost first, then the whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world,))
    for param in module.parameters():  # FSDP2 shards contiguous tensors only; the values stay
        if not param.is_contiguous():
            param.data = param.data.contiguous()
    blocks = [m for lst in module.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    for block in reversed(blocks):  # the innermost first: a block sharded inside another keeps its own group
        if any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)  # in place: the same object, its class FSDP<...>
    if hasattr(module, "x0"):  # a denoiser is called through x0 (docs/algorithm.md §1): gather for it as well
        register_fsdp_forward_method(module, "x0")
    return module


def start_processes(device: str = "auto", strategy: str = "ddp") -> Processes:
    """This process's Processes. Under torchrun (WORLD_SIZE > 1) the process group is joined through accelerate on
    gloo for the CPU ("cpu", or "auto" with no GPU) and nccl on this process's GPU; otherwise one process on `device`
    ("auto": CUDA when available). `strategy`: one of STRATEGIES."""
    _known(strategy)
    cuda = torch.cuda.is_available() and device != "cpu"
    if launched_world_size() == 1:
        single = torch.device("cuda" if cuda and device == "auto" else ("cpu" if device == "auto" else device))
        return Processes(single, strategy=strategy)
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(cpu=not cuda, kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    rank, world = accelerator.process_index, accelerator.num_processes
    return Processes(accelerator.device, rank, world, accelerator, strategy)


def check_strategy(strategy: str, world: int, accumulation: int) -> str:
    """ValueError naming the key for a strategy that is unknown, or sharding with nothing to share it out (one
    process and no accumulation: fsdp on one process only writes sharded checkpoints for a run of several)."""
    _known(strategy)
    if strategy != "ddp" and world == 1 and accumulation == 1:
        raise ValueError(f"--strategy {strategy} needs --processes > 1 (or --accumulation > 1 on one process)")
    return strategy


def check_batch(batch_size: int, world: int, accumulation: int, key: str = "align.batch_size") -> int:
    """The micro-batch each process computes at a time: `batch_size` / (world x accumulation), which must divide."""
    if world < 1 or accumulation < 1:
        raise ValueError(f"--processes and --accumulation must be >= 1, got {world} and {accumulation}")
    if batch_size % (world * accumulation):
        raise ValueError(
            f"{key} {batch_size} does not split over {world} processes x {accumulation} micro-batches (accumulation)"
        )
    return batch_size // (world * accumulation)


def _known(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy: unknown value {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def torchrun_command(argv: list[str], processes: int, env: Mapping[str, str] = os.environ) -> list[str]:
    """The command that runs `didr <argv>` as `processes` processes: torchrun --standalone on one node; in a SLURM
    allocation of several nodes (SLURM_JOB_NUM_NODES), srun starts one torchrun agent per node and they meet at the
    allocation's first node (c10d rendezvous on MASTER_PORT, default RENDEZVOUS_PORT, named by SLURM_JOB_ID)."""
    # On SIGTERM (a SLURM time limit signals every process of the step) or SIGUSR1 torchrun passes it on to the
    # workers and kills them SHUTDOWN_SECONDS later: long enough for any checkpoint (its default, 30 s, cuts an SDXL
    # one short). Unlisted, SIGUSR1 would kill torchrun itself (its default action) and orphan the workers.
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", f"--shutdown-timeout={SHUTDOWN_SECONDS}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    ]  # fmt: skip
    didr = ["-m", "didr.cli", *argv]
    nodes = int(env.get("SLURM_JOB_NUM_NODES", "1"))
    if nodes == 1:
        return [*torchrun, "--standalone", f"--nproc_per_node={processes}", *didr]
    if processes % nodes:
        raise ValueError(f"--processes {processes} does not split over the SLURM job's {nodes} nodes")
    head = _first_node(env)
    port = env.get("MASTER_PORT", str(RENDEZVOUS_PORT))
    return [
        "srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", *torchrun, f"--nnodes={nodes}",
        f"--nproc_per_node={processes // nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={head}:{port}",
        f"--rdzv_id={env.get('SLURM_JOB_ID', 'didr')}", *didr,
    ]  # fmt: skip


def _first_node(env: Mapping[str, str]) -> str:
    """The first host of SLURM_JOB_NODELIST (`scontrol show hostnames`, found on `env`'s PATH)."""
    nodelist = env.get("SLURM_JOB_NODELIST", "")
    try:
        listed = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, env=dict(env), timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: scontrol show hostnames failed ({error})") from None
    if listed.returncode != 0 or not listed.stdout.split():
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: scontrol show hostnames failed ({listed.stderr.strip()})")
    return listed.stdout.split()[0]


def run_processes(argv: list[str], processes: int) -> int:
    """Run `didr <argv>` as `processes` processes (torchrun_command) and wait for them (supervise)."""
    return supervise(torchrun_command(argv, processes))


def supervise(command: list[str]) -> int:
    """Run a launcher `command` (torchrun, or srun starting torchrun agents) and wait for it. SIGTERM, SIGUSR1 or
    SIGINT received meanwhile reaches the training processes, which checkpoint at the same step and stop; the exit
    code is then 75 (PREEMPTED_EXIT_CODE), else the launcher's. Under torchrun the signal goes to its children (the
    training processes themselves). Under srun it goes to srun as SIGUSR1, which srun passes on to its tasks, the
    torchrun agents, and they to their workers (the workers take SIGUSR1 as they take SIGTERM): srun answers SIGTERM
    by killing its tasks at once ("forcing job termination", no checkpoint written) and one SIGINT by printing their
    status."""
    launcher = subprocess.Popen(command, env=os.environ | {LOCKS_HELD: "1"})
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if command[0] == "srun":
            with contextlib.suppress(ProcessLookupError):
                os.kill(launcher.pid, signal.SIGUSR1)
            return
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
