"""Stage `score`: per-image rewards (training and held-out) and per-set fidelity against real and teacher images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor

from didr.config import Params
from didr.evaluation.fidelity import diversity, frechet_distance, kernel_distance
from didr.evaluation.inception import NAME, load_inception
from didr.evaluation.reference import load_reference
from didr.stages.common import load_reward, pick_device, read_run_params
from didr.stages.io import StageInputError, write_text_atomic
from didr.toy.data import ATTRIBUTES, parse_prompt, render
from didr.training.atomic import atomic_dir

FEATURES = "toy_alignment"


def load_images(sample_dir: Path) -> tuple[pd.DataFrame, Tensor]:
    """A sample set's index and its images [N, 3, H, W] in [0, 1]."""
    path = sample_dir / "index.parquet"
    if not path.is_file():
        raise StageInputError(f"{path}: missing (run `didr sample` first)")
    index = pd.read_parquet(path)
    arrays = [np.asarray(Image.open(sample_dir / p).convert("RGB")) for p in index["path"]]
    return index, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def real_images(prompts: list[str], size: int, seed: int) -> Tensor:
    """Rendered toy-world images for the prompts: the real data the fidelity metrics compare against."""
    labels = torch.stack([parse_prompt(p) for p in prompts])
    return (render(labels, size, torch.Generator().manual_seed(seed)) + 1) / 2


def _batched(fn, images: Tensor, prompts: list[str], device: torch.device, batch: int = 256) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [fn(images[i : i + batch].to(device), prompts[i : i + batch]).cpu() for i in range(0, len(images), batch)]
        )


def prompt_match(scorer, images: Tensor, prompts: list[str], device: torch.device) -> dict[str, np.ndarray]:
    """Toy world: per image, 1.0 where the attribute classifier reads the prompt's shape / colour / position /
    background in the image, else 0.0 (columns match_<attribute>; their means are the set's prompt-following
    accuracies)."""
    labels = torch.stack([parse_prompt(p) for p in prompts])
    read = _batched(lambda im, _: torch.stack([lg.argmax(1) for lg in scorer.logits(im)], 1), images, prompts, device)
    return {f"match_{a}": (read[:, i] == labels[:, i]).double().numpy() for i, a in enumerate(ATTRIBUTES)}


def fidelity_features(params: Params, teacher_dir: Path, prompts: list[str], size: int, dev: torch.device):
    """(features of images [N, 3, H, W] -> [N, D] float64, the real images' features, the extractor's name).

    toy_alignment: the toy classifier's features, real images rendered for the same prompts. inception: FID
    Inception-v3 pool features, real images from the reference file (`didr reference`)."""
    inception = params.score.features == "inception"
    if inception:
        model = load_inception(Path(params.score.inception), dev)
        extract, name = model.features, f"{NAME} sha256:{model.weights_sha256[:12]}"
    else:
        extract, name = load_reward(FEATURES, teacher_dir, dev).features, FEATURES

    def features(x: Tensor) -> Tensor:
        return _batched(lambda im, _: extract(im), x, prompts, dev).double()

    if inception:
        real = load_reference(Path(params.score.reference), model).features.double()
    else:
        real = features(real_images(prompts, size, params.seed))
    return features, real, name


def run_score(
    params: Params, teacher_dir: Path, sample_dir: Path, reference_dir: Path, out: Path, device: str = "auto"
) -> None:
    """out/per_image.parquet (one row per image, one column per reward) and out/summary.json (set metrics)."""
    dev = pick_device(device)
    index, images = load_images(sample_dir)
    _, teacher_images = load_images(reference_dir)
    prompts = index["prompt"].tolist()
    per_image = index.copy()
    for name in params.rewards.eval:
        reward = load_reward(name, teacher_dir, dev, params.rewards.models.get(name))
        per_image[name] = _batched(reward, images, prompts, dev).numpy()
    matches = []
    if params.score.features == FEATURES:
        columns = prompt_match(load_reward(FEATURES, teacher_dir, dev), images, prompts, dev)
        per_image, matches = per_image.assign(**columns), list(columns)
    features, real, extractor = fidelity_features(params, teacher_dir, prompts, images.shape[-1], dev)
    ours, teacher = features(images), features(teacher_images)
    kid_real, kid_real_std = kernel_distance(ours, real)
    kid_teacher, _ = kernel_distance(ours, teacher)
    run = read_run_params(sample_dir)
    summary = {
        "method": run["method"],
        "setting": run["setting"],
        "strength": run.get("strength"),
        "sample_dir": str(sample_dir),
        "images": len(index),
        **{f"{name}_mean": float(per_image[name].mean()) for name in params.rewards.eval},
        **{name: float(per_image[name].mean()) for name in matches},
        "features": extractor,
        "fid_real": frechet_distance(ours, real),
        "kid_real": kid_real,
        "kid_real_std": kid_real_std,
        "fid_teacher": frechet_distance(ours, teacher),
        "kid_teacher": kid_teacher,
        "diversity": diversity(ours),
    }
    with atomic_dir(out) as tmp:
        per_image.to_parquet(tmp / "per_image.parquet")
        write_text_atomic(tmp / "summary.json", json.dumps(summary, indent=1))
