"""Stage `align`: one method at one strength, from the warm start; resumable, preemption-safe."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from hashlib import sha256
from pathlib import Path

from didr.backbones.tuning import checkpoint_frozen_parts
from didr.config import Params
from didr.diffusion import UniformTime
from didr.grid import Run
from didr.methods import build_objective
from didr.objectives.fake_score import FakeScoreLoss
from didr.stages.common import load_fake, load_generator, load_prompts, load_reward, load_teacher, pick_device
from didr.stages.io import save_weights, write_text_atomic
from didr.training.atomic import atomic_dir
from didr.training.loop import align


def run_align(
    params: Params,
    teacher_dir: Path,
    warmup_dir: Path,
    out: Path,
    run: Run,
    checkpoint_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> None:
    """out/generator.safetensors (the EMA), out/fake.safetensors, out/metrics.parquet, out/params.json, written
    together when the run ends. Checkpoints go to `checkpoint_dir` (default out/../<name>.checkpoints), outside the
    output so that a scheduler that clears a failed job's output never loses them, in a sub-folder named by a digest
    of what the run trains with: a rerun with the same settings resumes from the latest checkpoint, a rerun after
    a change starts afresh. `run` names the method, its strength and the seed; `params.align` already carries the
    run's overrides."""
    dev = pick_device(device)
    teacher = load_teacher(teacher_dir, dev)
    if params.finetune.gradient_checkpointing:
        checkpoint_frozen_parts(teacher)
    reward = load_reward(params.rewards.train, teacher_dir, dev, params.rewards.models.get(params.rewards.train))
    generator, fake = load_generator(teacher, warmup_dir).train(), load_fake(teacher, warmup_dir)
    a = params.align
    method, strength, seed = run.method, run.strength, run.seed
    objective = build_objective(method, strength, teacher, fake, reward, a, params.finetune.gradient_checkpointing)
    record = {
        "stage": "align", "method": method, "strength": strength, "seed": seed, "run": run.id,
        "setting": run.setting, "params": asdict(params), "generator": {"t_star": generator.t_star},
    }  # fmt: skip
    identity = json.dumps(
        {"align": asdict(a), "finetune": asdict(params.finetune), "reward": params.rewards.train, "run": run.id},
        sort_keys=True,
    )
    checkpoint_dir = (checkpoint_dir or out.with_name(out.name + ".checkpoints")) / sha256(
        identity.encode()
    ).hexdigest()[:12]
    result = align(
        generator, objective, load_prompts(teacher_dir, "train", dev), steps=a.steps, batch_size=a.batch_size,
        fake=fake, fake_loss=FakeScoreLoss(fake, UniformTime(a.t_min, a.t_max_sampling)),
        fake_updates=a.fake_updates, lr=a.lr, fake_lr=a.fake_lr, grad_clip=a.grad_clip, ema_decay=a.ema_decay,
        seed=seed, checkpoint_dir=checkpoint_dir, checkpoint_every=a.checkpoint_every,
        metrics_path=checkpoint_dir / "metrics.parquet", params=record, resume=True, progress=progress,
    )  # fmt: skip
    with atomic_dir(out) as tmp:
        save_weights(result.ema, tmp / "generator.safetensors")
        save_weights(fake, tmp / "fake.safetensors")
        shutil.copy2(checkpoint_dir / "metrics.parquet", tmp / "metrics.parquet")
        write_text_atomic(tmp / "params.json", json.dumps(record, indent=1))
