"""Cost of the curvature-corrected Diffused Reward Proxy against Tweedie's (docs/algorithm.md §5.4, §5.5; issue 11).

For each toy teacher (VP: UNet2DConditionModel, flow: SD3Transformer2DModel, 16x16 pixels; untrained weights cost
the same as trained ones) with the toy preference model as the reward, teacher CFG 3 and batch 16, it times
(a) the proxy alone, one DRS estimate at t ~ U[0.02, 0.98], and (b) a DIDR step: one fake-score update (forward and
backward of its denoising loss) plus the generator's forward, the DIDR objective and the backward into the
generator (the optimiser steps, equal for every proxy, are left out). The proxies are timed in interleaved rounds,
so that load from other processes falls on all of them alike; each cell is the median of `--rounds` after
`--warmup`. Results are appended to benchmarks/RESULTS.md with the machine and the date.

Run: python benchmarks/drs_cost.py [--rounds 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch
from results import append_section

PROXIES = {"tweedie": ("tweedie", 1), "curvature, 1 iteration": ("curvature", 1),
           "curvature, 2 iterations": ("curvature", 2), "curvature, 4 iterations": ("curvature", 4)}  # fmt: skip


def _timed(device: str, fn: Callable[..., object], *args: object) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def didr_step(generator, fake_loss, objective, z, cond, rng) -> None:
    """One fake-score update's loss and backward, then the generator's forward, objective and backward."""
    with torch.no_grad():
        x0 = generator(z, cond)
    fake_loss(x0, cond, rng)[0].mean().backward()
    loss, _ = objective(generator(z, cond), cond, rng)
    loss.mean().backward()


def measure(kind: str, rounds: int, warmup: int, batch: int, device: str) -> dict[str, dict[str, float]]:
    """Per proxy, median seconds of one proxy call and of one DIDR step (fake update + generator pass)."""
    from didr.backbones.loading import denoiser_from_components
    from didr.diffusion import UniformTime
    from didr.generator import OneStepGenerator
    from didr.objectives import DIDR, FakeScoreLoss
    from didr.toy.data import prompt_sets
    from didr.toy.rewards import PreferenceModel
    from didr.toy.teacher import build_toy_pipeline

    torch.manual_seed(0)
    pipe = build_toy_pipeline(kind, size=16, seed=0)
    teacher = denoiser_from_components(type(pipe).__name__, pipe.components).to(device).frozen()
    reward = PreferenceModel().to(device).eval().requires_grad_(False)
    times = UniformTime(0.02, 0.98)
    prompts = teacher.encode_prompts(prompt_sets()[0])
    generator, fake = OneStepGenerator.from_teacher(teacher, t_star=0.9), teacher.trainable_copy()
    fake_loss = FakeScoreLoss(fake, times)
    objectives = {
        name: DIDR(teacher, fake, reward, 0.05, drs=mode, drs_steps=k, time_sampling=times, teacher_guidance=3.0)
        for name, (mode, k) in PROXIES.items()
    }
    rng = torch.Generator(device).manual_seed(0)
    seconds: dict[str, dict[str, list[float]]] = {name: {"proxy": [], "step": []} for name in PROXIES}
    for round_ in range(warmup + rounds):
        cond = prompts.select(torch.arange(round_ * batch, (round_ + 1) * batch) % len(prompts)).to(device)
        z = torch.randn(batch, *teacher.sample_shape, generator=rng, device=device)
        x_t = torch.randn(batch, *teacher.sample_shape, generator=rng, device=device)
        t = times(batch, rng, torch.device(device))
        for name, objective in objectives.items():
            proxy_seconds = _timed(device, objective.estimator, x_t, t, cond)
            step_seconds = _timed(device, didr_step, generator, fake_loss, objective, z, cond, rng)
            if round_ >= warmup:
                seconds[name]["proxy"].append(proxy_seconds)
                seconds[name]["step"].append(step_seconds)
    return {name: {part: statistics.median(v) for part, v in parts.items()} for name, parts in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--kinds", nargs="+", default=["vp", "flow"], choices=["vp", "flow"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for kind in args.kinds:
        results = measure(kind, args.rounds, args.warmup, args.batch_size, args.device)
        base = results["tweedie"]
        for name, r in results.items():
            print(kind, name, r, flush=True)
            rows.append(
                f"| {kind} | {name} | {r['proxy']:.3f} | {r['proxy'] / base['proxy']:.2f} | {r['step']:.3f} "
                f"| {r['step'] / base['step']:.2f} |"
            )
    append_section(
        [
            f"## Curvature-corrected DRP: cost against Tweedie, {datetime.date.today()}",
            "",
            f"Machine: {platform.machine()}, {platform.processor() or platform.platform()}, {args.threads} torch "
            f"thread(s), device {args.device}, torch {torch.__version__}. Toy teachers 16x16, toy preference reward, "
            f"CFG 3, beta 0.05, batch {args.batch_size}; a step is one fake-score update plus the generator's pass "
            f"(optimiser steps left out); medians of {args.rounds} interleaved rounds after {args.warmup}. "
            "`benchmarks/drs_cost.py`.",
            "",
            "| teacher | proxy | proxy s | x tweedie | DIDR step s | x tweedie |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    main()
