"""Time per training step and peak memory of each method on the toy teachers (issue 3, item 5; issue 16: few-step).

Each (round, method) runs in its own process (so peak memory is its own), the rounds interleaved (every method once
per round, in order), so that a load that drifts over the run slows every method alike; a row is the median over
rounds of each process's median step time, and the largest peak. The 1-minute load average is read before each
process and written down with the table.

One-step rows (`di`, ..., `didr K=4`, K the Diffused Reward Proxy's steps): the toy VP teacher (UNet2DConditionModel
at 16x16; untrained weights cost the same as trained ones), a one-step generator at t* 0.9 and a fake score copied
from the teacher, the toy preference model as the reward, batch `--batch-size`, `--fake-updates` fake updates per
generator step (TTUR), the align loop (didr/training/loop.py).
Flow rows (`flow ...`): the toy flow teacher (SD3Transformer2DModel at 16x16) with the loop each method trains with
in the pipeline: `flow 1-step dmd2` the one-step reference; `flow 4-step dmd2` and `flow 4-step didr` (Tweedie proxy)
the align loop on the deterministic forward of a 4-step CPS generator (eta 0.9, times 1 - k / 4); `acdmd` the AC-DMD
loop's stage 1 (each batch stopped at a random step, docs/algorithm.md §8.2); `rtdmd stage 2` its stage 2 (a SubGRPO
rollout of batch / 8 prompts x 8 on 2 of the first 2 transitions, the fake updates on its states, one generator step
with the last-step hinge at weight 1; §8.7); `sdpo` (batch / 2 pairs) and `grpo` (batch / 8 groups of 8, all 3
transitions) the policy loop (§8.5: one optimiser step per trained transition). A step is one generator step of the
align and AC-DMD loops, one sampling epoch of the others; "images" counts the generator's samples per step.
It times `--steps` steps after `--warmup` untimed ones in each process. Results are appended to
benchmarks/RESULTS.md with the machine and the date.

Run: python benchmarks/step_time.py [--steps 20] [--rounds 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from results import append_section

DRS = {"didr K=1": {"drs": "tweedie", "drs_steps": 1}, "didr K=2": {"drs": "k-step", "drs_steps": 2},
       "didr K=4": {"drs": "k-step", "drs_steps": 4}}  # fmt: skip
FEW_STEPS = 4  # network evaluations per image of the flow rows' few-step generator
METHODS = [
    "di", "dipp", "dmd2", *DRS, "flow 1-step dmd2", "flow 4-step dmd2", "flow 4-step didr", "flow 4-step acdmd",
    "flow 4-step rtdmd stage 2", "flow 4-step sdpo", "flow 4-step grpo",
]  # fmt: skip
GROUP = 8  # grpo's and rtdmd's samples per prompt


def images_per_step(method: str, batch_size: int, fake_updates: int) -> int:
    """The generator's samples per step: a batch per generator and per fake update (align, AC-DMD), or an epoch's
    rollout (rtdmd stage 2, sdpo, grpo)."""
    if method.endswith(("rtdmd stage 2", "sdpo", "grpo")):
        return batch_size
    return batch_size * (1 + fake_updates)


def measure(method: str, steps: int, warmup: int, batch_size: int, fake_updates: int, device: str) -> dict[str, float]:
    """Median step seconds and peak memory (MiB: CUDA allocator peak on a GPU, process peak RSS on the CPU)."""
    import torch

    from didr.backbones.loading import denoiser_from_components
    from didr.diffusion import UniformTime
    from didr.fewstep import FewStepGenerator
    from didr.generator import OneStepGenerator
    from didr.objectives import DI, DIDR, DMD2, DIPlusPlus, FakeScoreLoss
    from didr.objectives.acdmd import ACDMD
    from didr.objectives.grpo import GRPO
    from didr.objectives.rtdmd import RTDMD
    from didr.objectives.sdpo import SDPO
    from didr.toy.data import prompt_sets
    from didr.toy.rewards import PreferenceModel
    from didr.toy.teacher import build_toy_pipeline
    from didr.training.loop import align
    from didr.training.rl import train_policy
    from didr.training.rtdmd import train_rtdmd

    torch.manual_seed(0)
    flow = method.startswith("flow ")
    pipe = build_toy_pipeline("flow" if flow else "vp", size=16, seed=0)
    teacher = denoiser_from_components(type(pipe).__name__, pipe.components).to(device).frozen()
    reward = PreferenceModel().to(device).eval().requires_grad_(False)
    name = method.split()[-1] if not method.endswith("stage 2") else "rtdmd"
    if "4-step" in method:
        generator = FewStepGenerator.from_teacher(teacher, FEW_STEPS, eta=0.9, sampler="cps")
    else:
        generator = OneStepGenerator.from_teacher(teacher, t_star=0.9)
    fake, times = teacher.trainable_copy(), UniformTime(0.02, 0.98)
    prompts = teacher.encode_prompts(prompt_sets()[0])
    stamps: list[float] = []

    def on_step(step: int, logs: dict[str, float]) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    total, guidance = warmup + steps + 1, {"teacher_guidance": 3.0}
    if name in ("acdmd", "rtdmd"):
        acdmd = ACDMD(teacher, fake, times, **guidance)
        stage_two = dict(
            grpo=GRPO(GROUP, clip_range=1e-5, train_steps=2, step_range=2), reward=reward, reward_weight=1.0
        )
        train_rtdmd(
            generator, fake, RTDMD(acdmd, **stage_two) if name == "rtdmd" else RTDMD(acdmd), prompts, steps=total,
            batch_size=batch_size, groups=batch_size // GROUP, fake_updates=fake_updates, lr=1e-5, on_step=on_step,
        )  # fmt: skip
    elif name in ("sdpo", "grpo"):
        policy, groups = (
            (SDPO(len(prompts), FEW_STEPS - 1), batch_size // 2)
            if name == "sdpo"
            else (GRPO(GROUP), batch_size // GROUP)
        )
        train_policy(generator, policy, reward, prompts, epochs=total, groups=groups, lr=1e-5, on_epoch=on_step)
    else:
        drs = DRS.get(method, {"drs": "tweedie", "drs_steps": 1})
        objective = {
            "di": lambda: DI(teacher, fake, times, **guidance),
            "dipp": lambda: DIPlusPlus(teacher, fake, reward, 1.0, times, **guidance),
            "dmd2": lambda: DMD2(teacher, fake, times, **guidance, reward=reward, reward_weight=1.0),
            "didr": lambda: DIDR(teacher, fake, reward, 1.0, time_sampling=times, **guidance, **drs),
        }[method.split()[0] if not flow else name]()
        align(
            generator, objective, prompts, steps=total, batch_size=batch_size, fake=fake,
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
    parser.add_argument("--rounds", type=int, default=3, help="processes per method, interleaved across methods")
    parser.add_argument("--batch-size", type=int, default=16, help="a multiple of 8 (grpo's and rtdmd's groups)")
    parser.add_argument("--fake-updates", type=int, default=1, help="fake-score updates per generator step (TTUR)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_size % GROUP or args.rounds < 1:
        parser.error(f"--batch-size must be a multiple of {GROUP} and --rounds >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.warmup, args.batch_size, args.fake_updates, args.device)))
        return
    runs: dict[str, list[dict[str, float]]] = {method: [] for method in args.methods}
    loads = []
    for round_ in range(args.rounds):
        for method in args.methods:
            loads.append(os.getloadavg()[0])
            command = [sys.executable, __file__, "--one", method, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                       "--fake-updates", str(args.fake_updates), "--device", args.device,
                       *(["--threads", str(args.threads)] if args.threads else [])]  # fmt: skip
            runs[method].append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
            print(f"round {round_}", method, runs[method][-1], f"load {loads[-1]:.2f}", flush=True)
    import torch

    results = {
        method: {"seconds": statistics.median(r["seconds"] for r in rs), "peak_mib": max(r["peak_mib"] for r in rs)}
        for method, rs in runs.items()
    }
    base = results.get("dipp", next(iter(results.values())))
    base_name = "dipp" if "dipp" in results else next(iter(results))
    lines = [
        f"## Step time and peak memory per method, one-step and few-step, {datetime.date.today()}",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or platform.platform()}, {os.cpu_count()} CPUs, "
        f"{args.threads or torch.get_num_threads()} torch threads per process, device {args.device}, torch "
        f"{torch.__version__}. Toy teachers 16x16, batch {args.batch_size}, {args.fake_updates} fake update(s) per "
        f"generator step; per process the median of {args.steps} steps after {args.warmup}; {args.rounds} rounds "
        f"interleaved, the median over rounds. 1-minute load average before each process: mean "
        f"{statistics.mean(loads):.2f}, min {min(loads):.2f}, max {max(loads):.2f} (other work shared the machine). "
        "What a step is per row: benchmarks/step_time.py's docstring.",
        "",
        f"| method | NFE | images / step | s / step | x {base_name} | peak MiB | x {base_name} |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        nfe = FEW_STEPS if "4-step" in method else 1
        lines.append(
            f"| {method} | {nfe} | {images_per_step(method, args.batch_size, args.fake_updates)} | "
            f"{r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f} | {r['peak_mib']:.0f} "
            f"| {r['peak_mib'] / base['peak_mib']:.2f} |"
        )
    append_section(lines)


if __name__ == "__main__":
    main()
