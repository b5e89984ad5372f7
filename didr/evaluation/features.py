"""Fidelity features by name (params score.features): what the score stage measures FID, KID and diversity in.

A feature set maps images to features, gives the real images' features for a prompt list, and may say, per image,
whether the image shows what its prompt asks (`prompt_match`). `inception` (FID Inception-v3 pool features against
a reference file of real images' features, `didr reference`) is registered here; a world that knows its own real
data registers its own (the embedded world's `toy_alignment`, see didr/plugins.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from didr.evaluation.inception import NAME, load_inception
from didr.evaluation.reference import load_reference


def batched(fn, images: Tensor, prompts: Sequence[str], device: torch.device, batch: int = 256) -> Tensor:
    """fn(images, prompts) over batches of `batch` images moved to `device`, without gradients; on the CPU."""
    with torch.no_grad():
        return torch.cat(
            [fn(images[i : i + batch].to(device), prompts[i : i + batch]).cpu() for i in range(0, len(images), batch)]
        )


@dataclass(frozen=True)
class FeatureContext:
    """What a feature set is built from: the teacher stage's output, the device, the experiment seed, and the score
    section's files (inception weights, real images' reference features)."""

    teacher_dir: Path
    device: torch.device
    seed: int = 0
    inception: str | None = None
    reference: str | None = None


class FeatureSet:
    """Features of images [N, 3, H, W] in [0, 1] (on the CPU) as [N, D] float64, batched on the device."""

    name: str  # the extractor, as summary.json records it

    def __init__(self, extract: Callable[[Tensor], Tensor], name: str, device: torch.device):
        self.extract, self.name, self.device = extract, name, device

    def features(self, images: Tensor) -> Tensor:
        return batched(lambda im, _: self.extract(im), images, [""] * len(images), self.device).double()

    def real(self, prompts: list[str], size: int) -> Tensor:
        """The real images' features for `prompts` at `size` pixels."""
        raise NotImplementedError

    def prompt_match(self, images: Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
        """Per image, columns match_<what> of 1.0 / 0.0: the image shows what its prompt asks. None by default."""
        return {}


class InceptionFeatures(FeatureSet):
    """FID Inception-v3 pool features; the real ones are the reference file's."""

    def __init__(self, context: FeatureContext):
        if context.inception is None or context.reference is None:
            raise ValueError("score.features inception needs score.inception and score.reference")
        self.model = load_inception(Path(context.inception), context.device)
        self.reference = Path(context.reference)
        super().__init__(self.model.features, f"{NAME} sha256:{self.model.weights_sha256[:12]}", context.device)

    def real(self, prompts: list[str], size: int) -> Tensor:
        return load_reference(self.reference, self.model).features.double()


_FACTORIES: dict[str, Callable[[FeatureContext], FeatureSet]] = {}


def register_features(name: str, factory: Callable[[FeatureContext], FeatureSet]) -> None:
    """Register `factory(context) -> FeatureSet` under `name` (an existing name is replaced)."""
    _FACTORIES[name] = factory


def known_features() -> list[str]:
    """The registered names, sorted."""
    return sorted(_FACTORIES)


def build_features(name: str, context: FeatureContext) -> FeatureSet:
    """The feature set registered under `name`; ValueError naming it and the known names otherwise."""
    if name not in _FACTORIES:
        raise ValueError(f"score.features: unknown features {name!r}; known: {', '.join(known_features())}")
    return _FACTORIES[name](context)


register_features("inception", InceptionFeatures)
