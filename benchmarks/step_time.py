"""Time per alignment step and peak memory of each method on the toy teacher (issue 3, item 5).

Each method runs in its own process (so peak memory is its own): the toy VP teacher (UNet2DConditionModel at
16x16, untrained weights cost the same as trained ones), a one-step generator and a fake score copied from it, the
toy preference model as the reward, batch 16, `--fake-updates` fake updates per generator step (TTUR).
It times `--steps` generator steps after `--warmup` untimed ones and reports the median, with each method's ratio
to `dipp`.
Results are appended to benchmarks/RESULTS.md with the machine and the date.

Run: python benchmarks/step_time.py [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

from results import append_section

METHODS = {
    "di": {},
    "dipp": {},
    "dmd2": {},
    "didr K=1": {"drs": "tweedie", "drs_steps": 1},
    "didr K=2": {"drs": "k-step", "drs_steps": 2},
    "didr K=4": {"drs": "k-step", "drs_steps": 4},
}


def measure(method: str, steps: int, warmup: int, batch_size: int, fake_updates: int, device: str) -> dict[str, float]:
    """Median step seconds and peak memory (MiB: CUDA allocator peak on a GPU, process peak RSS on the CPU)."""
    import torch

    from didr.backbones.loading import denoiser_from_components
    from didr.diffusion import UniformTime
    from didr.generator import OneStepGenerator
    from didr.objectives import DI, DIDR, DMD2, DIPlusPlus, FakeScoreLoss
    from didr.toy.data import prompt_sets
    from didr.toy.rewards import PreferenceModel
    from didr.toy.teacher import build_toy_pipeline
    from didr.training.loop import align

    torch.manual_seed(0)
    pipe = build_toy_pipeline("vp", size=16, seed=0)
    teacher = denoiser_from_components(type(pipe).__name__, pipe.components).to(device).frozen()
    reward = PreferenceModel().to(device).eval().requires_grad_(False)
    generator, fake = OneStepGenerator.from_teacher(teacher, t_star=0.9), teacher.trainable_copy()
    times = UniformTime(0.02, 0.98)
    name = method.split()[0]
    objective = {
        "di": lambda: DI(teacher, fake, times, teacher_guidance=3.0),
        "dipp": lambda: DIPlusPlus(teacher, fake, reward, 1.0, times, teacher_guidance=3.0),
        "dmd2": lambda: DMD2(teacher, fake, times, teacher_guidance=3.0, reward=reward, reward_weight=1.0),
        "didr": lambda: DIDR(teacher, fake, reward, 1.0, time_sampling=times, teacher_guidance=3.0, **METHODS[method]),
    }[name]()
    prompts = teacher.encode_prompts(prompt_sets()[0])
    stamps: list[float] = []

    def on_step(step: int, logs: dict[str, float]) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    align(
        generator, objective, prompts, steps=warmup + steps + 1, batch_size=batch_size, fake=fake,
        fake_loss=FakeScoreLoss(fake, times), fake_updates=fake_updates, lr=1e-5, on_step=on_step,
    )  # fmt: skip
    step_times = [b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1 :], strict=True)]
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": statistics.median(step_times), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fake-updates", type=int, default=1, help="fake-score updates per generator step (TTUR)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.warmup, args.batch_size, args.fake_updates, args.device)))
        return
    results = {}
    for method in args.methods:
        command = [sys.executable, __file__, "--one", method, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch-size", str(args.batch_size), "--fake-updates", str(args.fake_updates),
                   "--device", args.device]  # fmt: skip
        results[method] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(method, results[method], flush=True)
    import torch

    base = results["dipp"]
    lines = [
        f"## Step time and peak memory per method, {datetime.date.today()}",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
        f"{torch.get_num_threads()} torch threads, device {args.device}, torch {torch.__version__}. "
        f"Toy VP teacher 16x16, batch {args.batch_size}, {args.fake_updates} fake update(s) per generator step, "
        f"median of {args.steps} steps after {args.warmup}.",
        "",
        "| method | s / step | x dipp | peak MiB | x dipp |",
        "|---|---|---|---|---|",
    ]
    for method, r in results.items():
        lines.append(
            f"| {method} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f} | {r['peak_mib']:.0f} "
            f"| {r['peak_mib'] / base['peak_mib']:.2f} |"
        )
    append_section(lines)


if __name__ == "__main__":
    main()
