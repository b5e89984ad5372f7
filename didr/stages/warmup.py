"""Stage `warmup`: the one-step generator from the teacher at t*, and the fake score fitted to its samples."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from didr.config import Params
from didr.diffusion import UniformTime
from didr.objectives import FakeScoreLoss
from didr.stages.common import load_prompts, load_teacher, new_fake, new_generator, pick_device
from didr.stages.io import save_weights, write_text_atomic
from didr.training.atomic import atomic_dir


def run_warmup(params: Params, teacher_dir: Path, out: Path, device: str = "auto", progress: bool = True) -> None:
    """out/generator.safetensors (the teacher's x0 at t*, or warmup.generator_weights), out/fake.safetensors
    (DSM-fitted), out/params.json; LoRA fine-tuning saves the adapters only."""
    dev = pick_device(device)
    teacher = load_teacher(teacher_dir, dev)
    prompts = load_prompts(teacher_dir, "train", dev)
    w, a = params.warmup, params.align
    generator, fake = new_generator(teacher, asdict(params)).eval(), new_fake(teacher, asdict(params))
    fake_loss = FakeScoreLoss(fake, UniformTime(a.t_min, a.t_max_sampling))
    optimiser = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=w.lr, betas=(0.0, 0.999))
    rng = torch.Generator(device=dev).manual_seed(params.seed)
    losses = []
    for _ in tqdm(range(w.steps), desc="warmup", disable=not progress):
        index = torch.randint(len(prompts), (w.batch_size,), generator=rng, device=dev)
        cond = prompts.select(index)
        z = torch.randn((w.batch_size, *generator.sample_shape), generator=rng, device=dev)
        with torch.no_grad():
            x0 = generator(z, cond)
        loss, logs = fake_loss(x0, cond, rng)
        optimiser.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimiser.step()
        losses.append(logs["loss_fake"])
    with atomic_dir(out) as tmp:
        save_weights(generator, tmp / "generator.safetensors")
        save_weights(fake, tmp / "fake.safetensors")
        record = {"stage": "warmup", "params": asdict(params), "generator": {"t_star": w.t_star}, "loss_fake": losses}
        write_text_atomic(tmp / "params.json", json.dumps(record, indent=1))
