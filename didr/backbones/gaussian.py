"""An analytic Gaussian reference whose denoiser and score are exact at every t (docs/algorithm.md §6.1).

Data x0 ~ N(mu, Sigma) in R^d. Under x_t = a x0 + s eps the marginal is p_t = N(a mu, a^2 Sigma + s^2 I) and the
posterior mean is m_t = mu + a Sigma (a^2 Sigma + s^2 I)^-1 (x_t - a mu), with posterior covariance
C_t = Sigma - a^2 Sigma (a^2 Sigma + s^2 I)^-1 Sigma = (Sigma^-1 + (a^2 / s^2) I)^-1. Written without Sigma^-1, so a
singular Sigma (a collapsed generator) is fine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from didr.backbones.base import Conditioning, Denoiser, check_t_star
from didr.diffusion import Schedule, expand_like


def gaussian_posterior_mean(x_t: Tensor, a: Tensor, s: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """m_t = mu + a Sigma (a^2 Sigma + s^2 I)^-1 (x_t - a mu), batched over a, s of shape [B]."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    m = expand_like(a**2, x_t)[..., None] * cov + expand_like(s**2, x_t)[..., None] * eye
    centred = x_t - expand_like(a, x_t) * mean
    return mean + expand_like(a, x_t) * (torch.linalg.solve(m, centred.unsqueeze(-1)).squeeze(-1) @ cov.T)


def gaussian_posterior_cov(a: Tensor, s: Tensor, cov: Tensor) -> Tensor:
    """C_t = Sigma - a^2 Sigma (a^2 Sigma + s^2 I)^-1 Sigma, one [d, d] matrix per time, shape [B, d, d]."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    m = (a**2)[:, None, None] * cov + (s**2)[:, None, None] * eye
    return cov - (a**2)[:, None, None] * cov @ torch.linalg.solve(m, cov.expand_as(m))


def gaussian_marginal_score(x_t: Tensor, a: Tensor, s: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """grad log N(x_t; a mu, a^2 Sigma + s^2 I) = -(a^2 Sigma + s^2 I)^-1 (x_t - a mu)."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    m = expand_like(a**2, x_t)[..., None] * cov + expand_like(s**2, x_t)[..., None] * eye
    centred = x_t - expand_like(a, x_t) * mean
    return -torch.linalg.solve(m, centred.unsqueeze(-1)).squeeze(-1)


class GaussianDenoiser(Denoiser):
    """The exact x0-predictor of N(mean, factor factor^T); unconditional, so prompts and guidance are ignored.

    Frozen, it is a reference ("teacher") with an exact score; trainable, its mean and Cholesky-like factor learn by
    denoising score matching, so it can serve as a fake score that is exact at its optimum.
    """

    def __init__(self, mean: Tensor, cov: Tensor, schedule: Schedule):
        super().__init__()
        mean = torch.as_tensor(mean)
        cov = torch.as_tensor(cov, dtype=mean.dtype)
        if mean.dim() != 1 or cov.shape != (mean.numel(), mean.numel()):
            shapes = f"{tuple(mean.shape)}, {tuple(cov.shape)}"
            raise ValueError(f"Gaussian reference needs mean [d] and cov [d, d], got {shapes}")
        if not torch.allclose(cov, cov.T) or bool((torch.linalg.eigvalsh(cov) <= 0).any()):
            raise ValueError("Gaussian reference cov must be symmetric positive definite")
        self.mean = nn.Parameter(mean.clone(), requires_grad=False)
        self.factor = nn.Parameter(torch.linalg.cholesky(cov), requires_grad=False)
        self.schedule = schedule
        self.sample_shape = (mean.numel(),)

    @property
    def cov(self) -> Tensor:
        """Sigma = L L^T."""
        return self.factor @ self.factor.T

    def predict_x0(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """The exact posterior mean m_t(x_t) of N(mean, cov)."""
        a, s = self.schedule.alpha_sigma(t.to(x_t.dtype))
        return gaussian_posterior_mean(x_t, a, s, self.mean, self.cov)

    def posterior_cov(self, t: Tensor) -> Tensor:
        """C_t per time, [B, d, d]."""
        a, s = self.schedule.alpha_sigma(t.to(self.mean.dtype))
        return gaussian_posterior_cov(a, s, self.cov)

    def marginal_score(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The exact score of p_t = N(a mu, a^2 Sigma + s^2 I)."""
        a, s = self.schedule.alpha_sigma(t.to(x_t.dtype))
        return gaussian_marginal_score(x_t, a, s, self.mean, self.cov)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return Conditioning(list(prompts))

    def decode(self, x0: Tensor) -> Tensor:
        """Samples are points of R^d: the "image" is the point itself."""
        return x0

    def make_generator(self, t_star: float, guidance: float = 1.0) -> AffineGenerator:
        """The affine map z -> m_{t*}(z) of this reference's posterior mean at t*, made trainable in full: the exact
        one-step generator of a Gaussian reference, whose law stays known (a generic denoiser's is
        `OneStepGenerator.from_teacher`)."""
        t = torch.tensor([check_t_star(t_star)], dtype=self.mean.dtype)
        a, s = self.schedule.alpha_sigma(t)
        eye = torch.eye(self.mean.numel(), dtype=self.mean.dtype)
        with torch.no_grad():
            weight = gaussian_posterior_mean(eye, a.expand(len(eye)), s.expand(len(eye)), self.mean, self.cov)
            bias = gaussian_posterior_mean(torch.zeros_like(self.mean)[None], a, s, self.mean, self.cov)[0]
        return AffineGenerator((weight - bias).T.contiguous(), bias)


class AffineGenerator(nn.Module):
    """x0 = W z + c: a one-step generator whose law N(c, W W^T) is known exactly."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.sample_shape = (bias.numel(),)

    def forward(self, z: Tensor, cond: Conditioning) -> Tensor:
        """x0 = W z + c (prompts are ignored)."""
        return z @ self.weight.T + self.bias

    def law(self) -> tuple[Tensor, Tensor]:
        """(mean, covariance) = (c, W W^T), detached."""
        weight = self.weight.detach()
        return self.bias.detach().clone(), weight @ weight.T


class AffineFakeScore(Denoiser):
    """The exact fake score of an AffineGenerator: the posterior mean of its own law N(c, W W^T), read live.

    It has no parameters of its own (the generator is held outside module registration), so a training loop sees
    nothing to fit: the fake score is exact at every step.
    """

    def __init__(self, generator: AffineGenerator, schedule: Schedule):
        super().__init__()
        self._generator = [generator]
        self.schedule = schedule
        self.sample_shape = generator.sample_shape
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def predict_x0(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """The exact posterior mean under the generator's current law N(c, W W^T)."""
        mean, cov = self._generator[0].law()
        a, s = self.schedule.alpha_sigma(t.to(x_t.dtype))
        return gaussian_posterior_mean(x_t, a, s, mean, cov)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return Conditioning(list(prompts))

    def decode(self, x0: Tensor) -> Tensor:
        return x0
