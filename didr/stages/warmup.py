"""Stage `warmup`: the one-step generator from the teacher at t*, and the fake score fitted to its samples."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from didr.config import Params
from didr.diffusion import UniformTime
from didr.objectives.fake_score import FakeScoreLoss
from didr.stages.common import generator_record, load_prompts, load_teacher, new_fake, new_generator
from didr.stages.io import save_weights, trained_state, write_text_atomic
from didr.training.atomic import atomic_dir, save_tensors
from didr.training.distributed import start_processes
from didr.training.warmup import warm_up_fake


def run_warmup(
    params: Params,
    teacher_dir: Path,
    out: Path,
    device: str = "auto",
    progress: bool = True,
    accumulation: int = 1,
    strategy: str = "ddp",
) -> None:
    """out/generator.safetensors (the teacher's x0 at t*, or warmup.generator_weights; K steps of it with
    warmup.generator.steps K > 1), out/fake.safetensors
    (DSM-fitted), out/params.json; LoRA fine-tuning saves the adapters only. Under torchrun each process computes its
    share of the batch in `accumulation` micro-batches (`strategy` fsdp: the fake score sharded over the processes),
    and the main process writes."""
    processes = start_processes(device, strategy)
    dev = processes.device
    teacher = load_teacher(teacher_dir, dev)
    prompts = load_prompts(teacher_dir, "train", dev)
    w, a = params.warmup, params.align
    torch.manual_seed(params.seed)  # the LoRA adapters' random initialisation, the same in every process and call
    generator, fake = new_generator(teacher, asdict(params)).eval(), new_fake(teacher, asdict(params))
    losses = warm_up_fake(
        generator, fake, prompts, steps=w.steps, batch_size=w.batch_size, lr=w.lr,
        fake_loss=FakeScoreLoss(fake, UniformTime(a.t_min, a.t_max_sampling)), seed=params.seed, progress=progress,
        processes=processes, accumulation=accumulation,
    )  # fmt: skip
    fake_weights = processes.full(trained_state(fake))  # fsdp: every process gathers its shards
    if not processes.main:
        return
    with atomic_dir(out) as tmp:
        save_weights(generator, tmp / "generator.safetensors")
        save_tensors({k: v.detach().contiguous().cpu() for k, v in fake_weights.items()}, tmp / "fake.safetensors")
        record = {
            "stage": "warmup", "params": asdict(params), "generator": generator_record(generator), "loss_fake": losses,
            "processes": processes.world, "accumulation": accumulation, "strategy": strategy,
        }  # fmt: skip
        write_text_atomic(tmp / "params.json", json.dumps(record, indent=1))
