"""The one-step generator g_theta(z, c) (docs/algorithm.md §2.1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from didr.backbones.base import Conditioning, Denoiser, check_t_star


class OneStepGenerator(nn.Module):
    """x0 = D_theta(z, t*, c): a trainable denoiser evaluated once at a fixed conditioning time t*.

    As in DMD2 and DI++, the input is the noise z itself (unit Gaussian, the sample space's shape) fed as x_{t*};
    at initialisation g is the teacher's own x0-prediction at t*.
    """

    def __init__(self, body: Denoiser, t_star: float, guidance: float = 1.0):
        super().__init__()
        self.body, self.t_star, self.guidance = body, check_t_star(t_star), guidance

    @classmethod
    def from_teacher(cls, teacher: Denoiser, t_star: float, guidance: float = 1.0) -> OneStepGenerator:
        """A generator on a trainable copy of `teacher`: at initialisation, the teacher's x0-prediction at t_star."""
        return cls(teacher.trainable_copy(), t_star=t_star, guidance=guidance)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.body.sample_shape

    def forward(self, z: Tensor, cond: Conditioning) -> Tensor:
        """x0 = D_theta(z, t*, c) with the generator's own guidance scale."""
        t = torch.full((z.shape[0],), self.t_star, device=z.device, dtype=z.dtype)
        return self.body.x0(z, t, cond, self.guidance)
