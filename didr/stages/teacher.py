"""Stage `teacher`: build (embedded world) or pin and cache (pretrained) the teacher, and its prompt embeddings."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from didr.backbones.base import Conditioning, Denoiser
from didr.backbones.loading import load_denoiser, resolve_source
from didr.config import Params
from didr.stages.common import pick_device
from didr.stages.io import read_prompts, save_embeddings, write_text_atomic
from didr.toy.rewards import train_toy_rewards
from didr.toy.teacher import train_teacher
from didr.training.atomic import atomic_dir


def encode(teacher: Denoiser, prompts: list[str], batch_size: int = 256) -> Conditioning:
    """Prompt embeddings in batches, concatenated."""
    parts = [teacher.encode_prompts(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    # every batch of one teacher has the empty prompt's embeddings when the first one has
    negative = (
        None
        if parts[0].negative is None
        else {k: torch.cat([cast("dict[str, Tensor]", p.negative)[k] for p in parts]) for k in parts[0].negative}
    )
    return Conditioning(prompts, {k: torch.cat([p.embeds[k] for p in parts]) for k in parts[0].embeds}, negative)


def run_teacher(params: Params, out: Path, progress: bool = True) -> None:
    """out/embeddings/{train,eval}-*.safetensors and out/params.json, plus, for the embedded world, out/pipeline (a
    diffusers pipeline folder) and out/rewards; a pretrained teacher is resolved at its pinned revision into the
    local Hugging Face cache (downloaded when the hub is reachable) and recorded in params.json, not copied."""
    prompts = {"train": read_prompts(Path(params.prompts.train)), "eval": read_prompts(Path(params.prompts.eval))}
    t = params.teacher
    with atomic_dir(out) as tmp:
        if t.kind == "pretrained":
            assert t.source is not None  # load_params requires teacher.source for a pretrained teacher
            folder = resolve_source(t.source, t.revision)
            record: dict[str, Any] = {"model": {"source": t.source, "revision": t.revision, "folder": str(folder)}}
        else:
            record = {"teacher": _train_embedded(params, tmp, progress)}
            folder = tmp / "pipeline"
        teacher = load_denoiser(folder, precision=t.precision, device=str(pick_device())).frozen()
        with torch.no_grad():
            for split, texts in prompts.items():
                save_embeddings(encode(teacher, texts), tmp / "embeddings", split)
        record = {"stage": "teacher", "params": asdict(params), **record}
        write_text_atomic(tmp / "params.json", json.dumps(record, indent=1, default=str))


def _train_embedded(params: Params, out: Path, progress: bool) -> dict:
    """The embedded world's teacher (out/pipeline) and toy rewards (out/rewards), trained from scratch; their
    training records."""
    t = params.teacher
    training = train_teacher(
        t.kind, out / "pipeline", steps=t.steps, batch_size=t.batch_size, lr=t.lr, seed=params.seed,
        size=t.size, n_images=t.n_images, progress=progress,
    )  # fmt: skip
    rewards = train_toy_rewards(
        out / "rewards", seed=t.reward_seed, size=t.size, progress=progress,
        alignment_steps=t.reward_alignment_steps, preference_steps=t.reward_preference_steps,
    )  # fmt: skip
    return {"training": training, "rewards": rewards}
