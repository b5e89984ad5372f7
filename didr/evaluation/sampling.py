"""Samples of a teacher (multi-step, deterministic, with CFG) and PNG image grids."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import solve


def initial_noise(n: int, shape: tuple[int, ...], generator: torch.Generator | Tensor, device: torch.device) -> Tensor:
    """z ~ N(0, I) of shape [n, *shape] drawn from `generator`, or `generator` itself when it is already the noise
    (so that sample sets of several models can share their noise)."""
    if isinstance(generator, Tensor):
        if generator.shape != (n, *shape):
            raise ValueError(f"noise of shape {tuple(generator.shape)} given for {n} samples of shape {shape}")
        return generator.to(device)
    return torch.randn((n, *shape), generator=generator, device=generator.device).to(device)


@torch.no_grad()
def sample_teacher(
    teacher: Denoiser, cond: Conditioning, steps: int, guidance: float, generator: torch.Generator | Tensor
) -> Tensor:
    """x0 of a `steps`-step deterministic solve (DDIM for VP, Euler for flow) from t = 1, x_1 ~ N(0, I), with CFG.

    One sample per prompt of `cond`; samples are in the teacher's own units (decode them with `teacher.decode`).
    """
    x = initial_noise(len(cond), teacher.sample_shape, generator, teacher.device)
    t = torch.ones(len(cond), device=x.device)
    return solve(lambda x_t, t_k: teacher.x0(x_t, t_k, cond, guidance), x, t, steps, teacher.schedule)


def image_grid(images: Tensor, nrow: int, scale: int = 1) -> Image.Image:
    """Images [N, 3, H, W] in [0, 1] laid out row-major, `nrow` per row, each pixel a scale x scale block."""
    n, channels, height, width = images.shape
    rows = -(-n // nrow)
    canvas = torch.zeros(channels, rows * height, nrow * width)
    for i, image in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, nrow)
        canvas[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    grid = Image.fromarray(pixels)
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def save_png(image: Tensor, path: str | Path) -> None:
    """One image [3, H, W] in [0, 1] as an 8-bit PNG."""
    image_grid(image[None], nrow=1).save(path)
