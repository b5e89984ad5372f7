"""Seconds per alignment step with 1 and with 2 processes sharing one run (torchrun, DDP through accelerate).

The toy VP teacher (UNet2DConditionModel at 16x16, untrained weights cost the same as trained ones), DIDR with the
toy preference reward, a global batch of `--batch-size` and one fake update per step; each process count is one
torchrun whose processes share the machine's cores equally (torch threads = cores / processes). The median step time
of `--steps` steps after `--warmup` is reported with its ratio to one process; on one machine's CPU this measures
the cost of the gradient all-reduce and of the smaller per-process batch, not a speed-up (that needs one device per
process). Appended to benchmarks/RESULTS.md with the machine and the date.

Run: python benchmarks/processes.py [--steps 20] [--processes 1 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

from results import append_section


def worker(steps: int, warmup: int, batch_size: int) -> None:
    """One process of the timed run (started by torchrun); rank 0 prints the step times as JSON."""
    import torch

    from didr.backbones.loading import denoiser_from_components
    from didr.diffusion import UniformTime
    from didr.generator import OneStepGenerator
    from didr.objectives import DIDR, FakeScoreLoss
    from didr.toy.data import prompt_sets
    from didr.toy.rewards import PreferenceModel
    from didr.toy.teacher import build_toy_pipeline
    from didr.training.distributed import start_processes
    from didr.training.loop import align

    processes = start_processes("cpu")
    torch.manual_seed(0)
    pipe = build_toy_pipeline("vp", size=16, seed=0)
    teacher = denoiser_from_components(type(pipe).__name__, pipe.components).frozen()
    reward = PreferenceModel().eval().requires_grad_(False)
    generator, fake = OneStepGenerator.from_teacher(teacher, t_star=0.9), teacher.trainable_copy()
    times = UniformTime(0.02, 0.98)
    objective = DIDR(teacher, fake, reward, beta=0.03, time_sampling=times, teacher_guidance=3.0)
    prompts = teacher.encode_prompts(prompt_sets(seed=0)[0][:64])
    result = align(
        generator, objective, prompts, steps=warmup + steps, batch_size=batch_size, fake=fake,
        fake_loss=FakeScoreLoss(fake, times), fake_updates=1, processes=processes,
    )  # fmt: skip
    if processes.main:
        print(json.dumps([row["step_seconds"] for row in result.history[warmup:]]))


def measure(processes: int, steps: int, warmup: int, batch_size: int) -> list[float]:
    cores = len(os.sched_getaffinity(0))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", __file__,
        "--worker", f"--steps={steps}", f"--warmup={warmup}", f"--batch-size={batch_size}",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, cores // processes)), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.warmup, args.batch_size)
        return
    import torch

    medians = {n: statistics.median(measure(n, args.steps, args.warmup, args.batch_size)) for n in args.processes}
    first = medians[args.processes[0]]
    append_section([
        f"## One run over several processes on the CPU, {datetime.date.today()}",
        "",
        f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, gloo. "
        f"Toy VP teacher 16x16, DIDR, global batch {args.batch_size}, 1 fake update, median of {args.steps} steps "
        f"after {args.warmup}; the cores shared equally by the processes (benchmarks/processes.py).",
        "",
        "| processes | s / step | x 1 process |",
        "|---|---|---|",
        *[f"| {n} | {m:.3f} | {m / first:.2f} |" for n, m in medians.items()],
    ])  # fmt: skip


if __name__ == "__main__":
    main()
