"""Linear and quadratic rewards on R^d, with their closed-form tilted laws and Diffused Reward Scores.

For a reference N(mu, Sigma) and the tilt p*(x) ~ p_ref(x) exp(r(x) / beta) (docs/algorithm.md §6.2, §6.3):
- linear r(x) = b^T x: p* = N(mu + Sigma b / beta, Sigma); DRS_t = (a / s^2) C_t b / beta.
- quadratic r(x) = -0.5 (x - m)^T Q (x - m): Sigma* = (Sigma^-1 + Q / beta)^-1, m* = Sigma* (Sigma^-1 mu + Q m / beta);
  DRS_t = -(a / s^2) C_t (C_t + beta Q^-1)^-1 (m_t - m).
C_t and m_t are the reference posterior's covariance and mean at x_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from didr.backbones.base import Conditioning
from didr.backbones.gaussian import GaussianDenoiser
from didr.diffusion import expand_like
from didr.rewards.base import DRSFn


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


class LinearReward:
    """r(x) = b^T x."""

    def __init__(self, direction: Tensor):
        self.direction = torch.as_tensor(direction)

    def __call__(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return images.flatten(1) @ self.direction.to(images)

    def tilt(self, mean: Tensor, cov: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """p* = N(mu + Sigma b / beta, Sigma)."""
        _check_beta(beta)
        return mean + cov @ self.direction.to(cov) / beta, cov.clone()

    def exact_drs(self, reference: GaussianDenoiser, beta: float) -> DRSFn:
        """DRS_t = (a / s^2) C_t b / beta."""
        _check_beta(beta)

        def drs(x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            a, s = reference.schedule.alpha_sigma(t.to(x_t.dtype))
            shift = reference.posterior_cov(t) @ self.direction.to(x_t)
            return expand_like(a / s**2, x_t) * shift / beta

        return drs


class QuadraticReward:
    """r(x) = -0.5 (x - m)^T Q (x - m), Q symmetric positive definite."""

    def __init__(self, centre: Tensor, precision: Tensor):
        self.centre = torch.as_tensor(centre)
        self.precision = torch.as_tensor(precision, dtype=self.centre.dtype)

    def __call__(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        d = images.flatten(1) - self.centre.to(images)
        return -0.5 * ((d @ self.precision.to(images)) * d).sum(1)

    def tilt(self, mean: Tensor, cov: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """Sigma* = (Sigma^-1 + Q / beta)^-1, m* = Sigma* (Sigma^-1 mu + Q m / beta)."""
        _check_beta(beta)
        q = self.precision.to(cov)
        cov_inv = torch.linalg.inv(cov)
        tilted_cov = torch.linalg.inv(cov_inv + q / beta)
        tilted_mean = tilted_cov @ (cov_inv @ mean + q @ self.centre.to(cov) / beta)
        return tilted_mean, (tilted_cov + tilted_cov.T) / 2

    def exact_drs(self, reference: GaussianDenoiser, beta: float) -> DRSFn:
        """DRS_t = -(a / s^2) C_t (C_t + beta Q^-1)^-1 (m_t - m)."""
        _check_beta(beta)

        def drs(x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            a, s = reference.schedule.alpha_sigma(t.to(x_t.dtype))
            c_t = reference.posterior_cov(t)
            m_t = reference.predict_x0(x_t, t, {})
            centred = (m_t - self.centre.to(x_t)).unsqueeze(-1)
            inner = torch.linalg.solve(c_t + beta * torch.linalg.inv(self.precision.to(x_t)), centred)
            return -expand_like(a / s**2, x_t) * (c_t @ inner).squeeze(-1)

        return drs
