"""The fake ("TA") score's denoising loss on detached generator samples (docs/algorithm.md §2.2)."""

from __future__ import annotations

import torch
from torch import Tensor

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import UniformTime
from didr.objectives.common import TimeSampler, draw_noisy

FAKE_WEIGHTINGS = ("eps", "x0")


class FakeScoreLoss:
    """Denoising score matching, no CFG, no reward: lambda(t) mean_dims ||D_psi(x_t, t) - x0||^2.

    lambda = a^2 / s^2 ('eps', the usual epsilon-prediction loss) or 1 ('x0').
    """

    def __init__(self, fake: Denoiser, time_sampling: TimeSampler | None = None, weighting: str = "eps"):
        if weighting not in FAKE_WEIGHTINGS:
            raise ValueError(f"fake_weighting: unknown value {weighting!r}; choose one of {list(FAKE_WEIGHTINGS)}")
        self.fake, self.weighting = fake, weighting
        self.time_sampling = time_sampling or UniformTime()

    def __call__(self, x0: Tensor, cond: Conditioning, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x0 = x0.detach()
        noisy = draw_noisy(x0, self.fake, self.time_sampling, generator)
        error = ((self.fake.x0(noisy.x_t, noisy.t, cond) - x0) ** 2).flatten(1).mean(1)
        if self.weighting == "eps":
            error = error * (noisy.a**2 / noisy.s**2).flatten(1)[:, 0]
        return error, {"loss_fake": error.mean().item()}
