"""Loading what earlier stages wrote: the teacher, its prompt embeddings, generators and rewards."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from didr.backbones.base import Conditioning, Denoiser
from didr.backbones.loading import load_denoiser
from didr.rewards.base import Reward
from didr.rewards.registry import build_reward
from didr.stages.io import StageInputError, load_embeddings, load_weights


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when available, else the CPU."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def load_teacher(teacher_dir: Path, device: torch.device) -> Denoiser:
    """The frozen teacher saved by the teacher stage (a diffusers pipeline folder)."""
    if not (teacher_dir / "pipeline").is_dir():
        raise StageInputError(f"{teacher_dir / 'pipeline'}: no teacher pipeline (run `didr teacher` first)")
    return load_denoiser(teacher_dir / "pipeline").to(device).frozen()


def load_prompts(teacher_dir: Path, split: str, device: torch.device) -> Conditioning:
    """Cached prompt embeddings ('train' or 'eval') of the teacher stage."""
    return load_embeddings(teacher_dir / "embeddings", split).to(device)


def load_reward(name: str, teacher_dir: Path, device: torch.device) -> Reward:
    """A registered reward; trained toy rewards come from the teacher stage's rewards folder."""
    reward = build_reward(name, folder=teacher_dir / "rewards")
    return reward.to(device) if isinstance(reward, nn.Module) else reward


def read_run_params(run_dir: Path) -> dict:
    """params.json of a stage output folder."""
    path = run_dir / "params.json"
    if not path.is_file():
        raise StageInputError(f"{path}: missing (not a stage output folder?)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_generator(teacher: Denoiser, run_dir: Path) -> nn.Module:
    """The one-step generator saved by the warmup or align stage (its weights and its t*)."""
    t_star = read_run_params(run_dir)["generator"]["t_star"]
    generator = teacher.make_generator(t_star=t_star)
    load_weights(generator, run_dir / "generator.safetensors")
    return generator.eval()
