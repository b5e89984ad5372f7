"""Step time, peak memory and achieved TFLOP/s of one SDXL-sized `didr` alignment step, on 1 GPU and on all visible.

The step is the project's own (`didr.training.loop.align`, didr with the K = 1 Tweedie proxy, teacher CFG 3, one
fake-score update per generator step), built as benchmarks/memory.py builds it: SDXL base's UNet, VAE and text
encoders from their published configs with random weights (the cost does not depend on the values), an
HPSv2-sized CLIP reward, 1024 px (128 x 128 latents), bf16 autocast, gradient checkpointing; LoRA rank 64 and full
fine-tuning. One sample per GPU: with N GPUs the run is N processes (torchrun, DDP) on a global batch of N.
FLOPs are counted once per configuration with torch's FlopCounterMode over one whole step (forward and backward of
every network), and TFLOP/s is that count over the median step time, per GPU. Full fine-tuning needs about
115 GiB (benchmarks/RESULTS.md) and runs out of memory on one 80 GB GPU: the table says so.
Appended to benchmarks/RESULTS.md with the device name and the date.

Run: python benchmarks/gpu_step.py [--steps 10] [--warmup 2]
     python benchmarks/gpu_step.py --tiny --device cpu   (SDXL's structure at toy widths: the same code, in seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
from unittest import mock

from results import append_section

CONFIGS = {"lora": 64, "full": 0}  # LoRA rank; 0 = full fine-tuning


def shrunk() -> contextlib.ExitStack:
    """memory.py's configs at toy widths (SDXL's structure), for a run on the CPU."""
    from memory import HPS_CLIP, SDXL_TEXT, SDXL_UNET, SDXL_VAE

    stack = contextlib.ExitStack()
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    for patch in [
        mock.patch.dict(SDXL_UNET, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                        attention_head_dim=(2, 4, 4), sample_size=16),
        mock.patch.dict(SDXL_VAE, block_out_channels=(32,) * 4, sample_size=128),
        mock.patch.dict(SDXL_TEXT, {k: {**v, **small} for k, v in SDXL_TEXT.items()}),
        mock.patch.dict(HPS_CLIP, {k: {**HPS_CLIP[k], **small} for k in ("vision_config", "text_config")}),
    ]:  # fmt: skip
        stack.enter_context(patch)
    return stack


def worker(config: str, steps: int, warmup: int, device: str, tiny: bool) -> dict[str, float | str]:
    """Build the step and time it in this process (one of torchrun's, or alone); rank 0's numbers."""
    import torch
    from memory import hps_reward, prompt_cache, sdxl_teacher
    from torch.utils.flop_counter import FlopCounterMode

    from didr.backbones.tuning import checkpoint_frozen_parts
    from didr.config import AlignParams
    from didr.diffusion import UniformTime
    from didr.methods import build_objective
    from didr.objectives import FakeScoreLoss
    from didr.stages.common import new_fake, new_generator
    from didr.training.distributed import start_processes
    from didr.training.loop import align

    processes = start_processes(device)
    with shrunk() if tiny else contextlib.nullcontext():
        teacher = sdxl_teacher("bf16").to(processes.device)
        reward = hps_reward().to(processes.device)
    checkpoint_frozen_parts(teacher)
    params = {"warmup": {"t_star": 0.9, "generator_weights": None},
              "finetune": {"lora_rank": CONFIGS[config], "gradient_checkpointing": True}}  # fmt: skip
    a = AlignParams(batch_size=processes.world, fake_updates=1)
    prompts = prompt_cache(2 * processes.world).to(processes.device)
    cuda = processes.device.type == "cuda"
    try:
        generator, fake = new_generator(teacher, params).train(), new_fake(teacher, params)
        objective = build_objective("didr", 0.03, teacher, fake, reward, a, True)

        def run(n: int) -> list[dict[str, float]]:
            return align(
                generator, objective, prompts, steps=n, batch_size=a.batch_size, fake=fake,
                fake_loss=FakeScoreLoss(fake, UniformTime(a.t_min, a.t_max_sampling)), fake_updates=1, lr=a.lr,
                fake_lr=a.fake_lr, grad_clip=a.grad_clip, ema_decay=a.ema_decay, processes=processes,
            ).history  # fmt: skip

        with FlopCounterMode(display=False) as counter:
            run(1)
        flops = counter.get_total_flops()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(row["step_seconds"] for row in run(warmup + steps)[warmup:])
    except torch.cuda.OutOfMemoryError:
        return {"config": config, "processes": processes.world, "result": "out of memory"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"config": config, "processes": processes.world, "seconds": seconds, "peak_gib": peak,
            "tflops_per_gpu": flops / seconds / 1e12}  # fmt: skip


def measure(config: str, processes: int, args: argparse.Namespace) -> dict[str, float | str]:
    """One configuration on `processes` processes (torchrun when more than one); rank 0's numbers."""
    options = [f"--config={config}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--device={args.device}"]
    options += ["--tiny"] * args.tiny
    start = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
    ]  # fmt: skip
    done = subprocess.run([*start, __file__, "--worker", *options], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="SDXL's structure at toy widths (a smoke run)")
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.config, args.steps, args.warmup, args.device, args.tiny)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    import torch

    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    counts = sorted({1, gpus}) if gpus > 1 else [1]
    rows = [measure(config, n, args) for config in CONFIGS for n in counts]
    device = torch.cuda.get_device_name() if gpus else "cpu"
    size = "SDXL's structure at toy widths" if args.tiny else "SDXL base 1.0 sizes, 1024 px"
    append_section([
        f"## SDXL didr step on {gpus or 'no'} GPU(s): time, memory, TFLOP/s, {datetime.date.today()}",
        "",
        f"Device: {device} ({max(gpus, 1)} visible), torch {torch.__version__}. {size}, bf16 autocast, gradient "
        f"checkpointing, one sample per GPU, median of {args.steps} steps after {args.warmup} "
        "(benchmarks/gpu_step.py).",
        "",
        "| fine-tuning | GPUs | s / step | peak GiB per GPU | TFLOP/s per GPU |",
        "|---|---|---|---|---|",
        *[
            f"| {r['config']} | {r['processes']} | " + (
                f"{r['seconds']:.3f} | {r['peak_gib']:.1f} | {r['tflops_per_gpu']:.1f} |" if "seconds" in r
                else f"{r['result']} | | |"
            )
            for r in rows
        ],
    ])  # fmt: skip


if __name__ == "__main__":
    main()
