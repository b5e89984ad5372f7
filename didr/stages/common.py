"""Loading what earlier stages wrote: the teacher, its prompt embeddings, generators, fake scores and rewards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from didr.backbones.adapter import DiffusersDenoiser
from didr.backbones.base import Conditioning
from didr.backbones.hub import resolve_file
from didr.backbones.loading import load_denoiser
from didr.backbones.tuning import add_lora, enable_gradient_checkpointing
from didr.config import ScoreParams
from didr.evaluation.features import FeatureContext, FeatureSet, build_features
from didr.fewstep import FewStepGenerator
from didr.generator import OneStepGenerator
from didr.plugins import load_plugins
from didr.rewards.base import Reward
from didr.rewards.registry import build_reward
from didr.stages.io import StageInputError, check_state, load_embeddings, load_weights


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when available, else the CPU."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def load_teacher(teacher_dir: Path, device: torch.device) -> DiffusersDenoiser:
    """The frozen teacher of the teacher stage: its trained pipeline folder (embedded world) or the pretrained
    pipeline it pinned (source at revision, from the local cache), at the precision of its params."""
    if not (teacher_dir / "params.json").is_file():
        raise StageInputError(f"{teacher_dir}: no teacher stage output (run `didr teacher` first)")
    t = read_run_params(teacher_dir)["params"]["teacher"]
    if t["kind"] == "pretrained":
        source, revision = t["source"], t["revision"]
    else:
        source, revision = teacher_dir / "pipeline", None
        if not source.is_dir():
            raise StageInputError(f"{source}: no teacher pipeline (run `didr teacher` first)")
    return load_denoiser(source, revision, precision=t["precision"]).to(device).frozen()


def load_prompts(teacher_dir: Path, split: str, device: torch.device) -> Conditioning:
    """Cached prompt embeddings ('train' or 'eval') of the teacher stage."""
    return load_embeddings(teacher_dir / "embeddings", split).to(device)


def load_reward(name: str, teacher_dir: Path, device: torch.device, options: dict[str, Any] | None = None) -> Reward:
    """A registered reward built with its options (rewards.models); a world's trained rewards (the toy ones) come
    from the teacher stage's rewards folder."""
    load_plugins()
    try:
        reward = build_reward(name, folder=teacher_dir / "rewards", **(options or {}))
    except (SafetensorError, OSError) as error:  # a truncated or missing weights file of a world's trained reward
        reason = " ".join(str(error).split())
        raise StageInputError(f"{teacher_dir / 'rewards'}: reward {name!r} cannot be loaded ({reason})") from None
    return reward.to(device) if isinstance(reward, nn.Module) else reward


def load_features(score: ScoreParams, seed: int, teacher_dir: Path, device: torch.device) -> FeatureSet:
    """The fidelity features of params.score (its inception and reference files; a world's features read the teacher
    stage's output and the experiment seed)."""
    load_plugins()
    context = FeatureContext(teacher_dir, device, seed, score.inception, score.reference)
    return build_features(score.features, context)


def read_run_params(run_dir: Path) -> dict:
    """params.json of a stage output folder."""
    path = run_dir / "params.json"
    if not path.is_file():
        raise StageInputError(f"{path}: missing (not a stage output folder?)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_network_weights(denoiser: DiffusersDenoiser, spec: dict[str, str]) -> None:
    """Replace a copy's network weights by a state dict file (warmup.generator_weights): a local file, or `file` of
    the hub repo `source` at `revision`. safetensors, or a torch state dict read with weights_only (no code runs)."""
    path = resolve_file(spec.get("source") or spec["file"], spec.get("revision"), spec["file"])
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    check_state(path, state, denoiser.net.state_dict())
    denoiser.net.load_state_dict(state)


def trainable(
    teacher: DiffusersDenoiser, finetune: dict[str, Any], weights: dict[str, str] | None = None
) -> DiffusersDenoiser:
    """A trainable copy of the teacher as params.finetune says. LoRA (lora_rank > 0): adapters on a copy that shares
    the teacher's frozen weights, unless `weights` (warmup.generator_weights) replace them in a copy of its own; full
    fine-tuning (lora_rank 0): a copy of everything. Gradient checkpointing when asked."""
    lora = finetune["lora_rank"] > 0
    copy = teacher.shared_copy() if lora and weights is None else teacher.trainable_copy()
    if weights is not None:
        load_network_weights(copy, weights)
    if lora:
        add_lora(copy, finetune["lora_rank"])
    if finetune["gradient_checkpointing"]:
        enable_gradient_checkpointing(copy)
    return copy.train()


def new_generator(teacher: DiffusersDenoiser, params: dict[str, Any]) -> OneStepGenerator | FewStepGenerator:
    """The generator of warmup.generator on the teacher's network, or warmup.generator_weights, fine-tuned as
    params.finetune says (`params` as a stage's params.json holds them): the one-step generator at warmup.t_star
    (steps 1, also for params.json files older than warmup.generator), else a K-step FewStepGenerator (§8.1)."""
    body = trainable(teacher, params["finetune"], params["warmup"]["generator_weights"])
    settings = params["warmup"].get("generator") or {"steps": 1}
    if settings["steps"] == 1:
        return OneStepGenerator(body, t_star=params["warmup"]["t_star"])
    return FewStepGenerator(body, settings["steps"], settings["eta"], settings["sampler"], settings["times"])


def generator_record(generator: nn.Module) -> dict[str, Any]:
    """What a stage's params.json says of its generator: steps (network evaluations per image), and t_star (one
    step) or the sampler, eta and times (K steps)."""
    if isinstance(generator, FewStepGenerator):
        times = generator.times.tolist()
        return {"steps": generator.steps, "sampler": generator.sampler, "eta": generator.eta, "times": times}
    return {"steps": 1, "t_star": generator.t_star}


def new_fake(teacher: DiffusersDenoiser, params: dict[str, Any]) -> DiffusersDenoiser:
    """The fake score: a trainable copy of the teacher, fine-tuned as params.finetune says."""
    return trainable(teacher, params["finetune"])


def load_generator(teacher: DiffusersDenoiser, run_dir: Path) -> nn.Module:
    """The generator saved by the warmup or align stage (rebuilt from its params, then its weights)."""
    generator = new_generator(teacher, read_run_params(run_dir)["params"])
    load_weights(generator, run_dir / "generator.safetensors")
    return generator.eval()


def load_fake(teacher: DiffusersDenoiser, run_dir: Path) -> DiffusersDenoiser:
    """The fake score saved by the warmup or align stage."""
    fake = new_fake(teacher, read_run_params(run_dir)["params"])
    load_weights(fake, run_dir / "fake.safetensors")
    return fake
