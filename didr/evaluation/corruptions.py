"""Controlled image corruptions of graded strength, to check that a fidelity judge ranks what a person sees.

Each maps images [N, 3, H, W] in [0, 1] and a strength >= 0 (0 is the identity) to images in [0, 1]; the random
ones draw from a generator seeded with `seed`, so a corruption is a fixed function of (images, strength, seed):
- blur: Gaussian blur of standard deviation `strength` pixels (reflect padding);
- noise: additive Gaussian noise of standard deviation `strength`;
- speckle: a share `strength` of the pixels replaced by uniformly random colours (isolated-pixel speckle);
- oversaturation: chroma scaled by 1 + strength about each pixel's luma (0.299 R + 0.587 G + 0.114 B);
- colour_shift: one random RGB offset per image, of Euclidean norm `strength`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)


def _generator(images: Tensor, seed: int) -> torch.Generator:
    return torch.Generator(images.device).manual_seed(seed)


def blur(images: Tensor, strength: float, seed: int = 0) -> Tensor:
    """Separable Gaussian blur, sigma = strength pixels, kernel radius ceil(4 sigma)."""
    if strength == 0:
        return images.clone()
    radius = math.ceil(4 * strength)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / strength) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect" if radius < images.shape[-1] else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels).clamp(0, 1)


def noise(images: Tensor, strength: float, seed: int = 0) -> Tensor:
    """x + strength N(0, I), clamped to [0, 1]."""
    eps = torch.randn(images.shape, generator=_generator(images, seed), device=images.device, dtype=images.dtype)
    return (images + strength * eps).clamp(0, 1)


def speckle(images: Tensor, strength: float, seed: int = 0) -> Tensor:
    """Each pixel, with probability `strength`, replaced by a colour drawn uniformly from [0, 1]^3."""
    generator = _generator(images, seed)
    n, _, h, w = images.shape
    hit = torch.rand((n, 1, h, w), generator=generator, device=images.device) < strength
    colours = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return torch.where(hit, colours, images)


def oversaturation(images: Tensor, strength: float, seed: int = 0) -> Tensor:
    """luma + (1 + strength) (x - luma), clamped: colours pushed away from grey."""
    luma = (images * images.new_tensor(LUMA)[:, None, None]).sum(1, keepdim=True)
    return (luma + (1 + strength) * (images - luma)).clamp(0, 1)


def colour_shift(images: Tensor, strength: float, seed: int = 0) -> Tensor:
    """x + strength d, d a random unit RGB direction per image, clamped."""
    direction = torch.randn((images.shape[0], 3), generator=_generator(images, seed), device=images.device)
    direction = direction / direction.norm(dim=1, keepdim=True)
    return (images + strength * direction.to(images.dtype)[:, :, None, None]).clamp(0, 1)


CORRUPTIONS: dict[str, Callable[[Tensor, float, int], Tensor]] = {
    "blur": blur,
    "noise": noise,
    "speckle": speckle,
    "oversaturation": oversaturation,
    "colour_shift": colour_shift,
}


def corrupt(name: str, images: Tensor, strength: float, seed: int = 0) -> Tensor:
    """The corruption `name` at `strength`; ValueError naming it (or a negative strength) otherwise."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption: unknown name {name!r}; choose one of {sorted(CORRUPTIONS)}")
    if not strength >= 0:
        raise ValueError(f"corruption {name}: strength must be >= 0, got {strength}")
    return CORRUPTIONS[name](images, strength, seed)
