"""Stage `score`: per-image rewards (training and held-out) and per-set fidelity against real and teacher images
(FID with 95% bootstrap intervals, KID, diversity)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor

from didr.config import Params
from didr.evaluation.features import batched
from didr.evaluation.fidelity import diversity, frechet_distance, frechet_interval, kernel_distance
from didr.stages.common import load_features, load_reward, pick_device, read_run_params
from didr.stages.io import StageInputError, write_text_atomic
from didr.training.atomic import atomic_dir


def load_images(sample_dir: Path) -> tuple[pd.DataFrame, Tensor]:
    """A sample set's index and its images [N, 3, H, W] in [0, 1]."""
    path = sample_dir / "index.parquet"
    if not path.is_file():
        raise StageInputError(f"{path}: missing (run `didr sample` first)")
    index = pd.read_parquet(path)
    arrays = [np.asarray(Image.open(sample_dir / p).convert("RGB")) for p in index["path"]]
    return index, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


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
        per_image[name] = batched(reward, images, prompts, dev).numpy()
    fidelity = load_features(params.score, params.seed, teacher_dir, dev)
    columns = fidelity.prompt_match(images, prompts)
    per_image, matches = per_image.assign(**columns), list(columns)
    real = fidelity.real(prompts, images.shape[-1])
    ours, teacher = fidelity.features(images), fidelity.features(teacher_images)
    kid_real, kid_real_std = kernel_distance(ours, real)
    kid_teacher, _ = kernel_distance(ours, teacher)
    run = read_run_params(sample_dir)
    real_low, real_high = frechet_interval(ours, real, seed=params.seed)
    teacher_low, teacher_high = frechet_interval(ours, teacher, seed=params.seed)
    summary = {
        "method": run["method"],
        "setting": run["setting"],
        "strength": run.get("strength"),
        "sample_dir": str(sample_dir),
        "images": len(index),
        **{f"{name}_mean": float(per_image[name].mean()) for name in params.rewards.eval},
        **{name: float(per_image[name].mean()) for name in matches},
        "features": fidelity.name,
        "fid_real": frechet_distance(ours, real),
        "fid_real_low": real_low,  # the 95% bootstrap interval (200 resamples)
        "fid_real_high": real_high,
        "kid_real": kid_real,
        "kid_real_std": kid_real_std,
        "fid_teacher": frechet_distance(ours, teacher),
        "fid_teacher_low": teacher_low,
        "fid_teacher_high": teacher_high,
        "kid_teacher": kid_teacher,
        "diversity": diversity(ours),
    }
    with atomic_dir(out) as tmp:
        per_image.to_parquet(tmp / "per_image.parquet")
        write_text_atomic(tmp / "summary.json", json.dumps(summary, indent=1))
