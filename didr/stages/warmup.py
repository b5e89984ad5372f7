"""Stage `warmup`: the one-step generator from the teacher at t*, and the fake score fitted to its samples."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from didr.config import Params
from didr.diffusion import UniformTime
from didr.objectives.fake_score import FakeScoreLoss
from didr.stages.common import load_prompts, load_teacher, new_fake, new_generator, pick_device
from didr.stages.io import save_weights, write_text_atomic
from didr.training.atomic import atomic_dir
from didr.training.warmup import warm_up_fake


def run_warmup(params: Params, teacher_dir: Path, out: Path, device: str = "auto", progress: bool = True) -> None:
    """out/generator.safetensors (the teacher's x0 at t*, or warmup.generator_weights), out/fake.safetensors
    (DSM-fitted), out/params.json; LoRA fine-tuning saves the adapters only."""
    dev = pick_device(device)
    teacher = load_teacher(teacher_dir, dev)
    prompts = load_prompts(teacher_dir, "train", dev)
    w, a = params.warmup, params.align
    generator, fake = new_generator(teacher, asdict(params)).eval(), new_fake(teacher, asdict(params))
    losses = warm_up_fake(
        generator, fake, prompts, steps=w.steps, batch_size=w.batch_size, lr=w.lr,
        fake_loss=FakeScoreLoss(fake, UniformTime(a.t_min, a.t_max_sampling)), seed=params.seed, progress=progress,
    )  # fmt: skip
    with atomic_dir(out) as tmp:
        save_weights(generator, tmp / "generator.safetensors")
        save_weights(fake, tmp / "fake.safetensors")
        record = {"stage": "warmup", "params": asdict(params), "generator": {"t_star": w.t_star}, "loss_fake": losses}
        write_text_atomic(tmp / "params.json", json.dumps(record, indent=1))
