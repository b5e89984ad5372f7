"""Machinery shared by the integral-KL objectives (docs/algorithm.md §3).

All objectives work in x0 units. With x_t = a sg(x0) + s eps, the IKL generator gradient
E w(t) (S_psi - S_target)^T dx_t/dtheta equals E u(t) (x0_psi - x0_target)^T dx0/dtheta with the x0-unit weight
u(t) = w(t) a^2 / s^2; the pseudo-loss u <sg(G), x0> with G = x0_psi - x0_target has exactly that gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import LogitNormalTime, UniformTime, batch_randn, expand_like
from didr.rewards.base import Reward

TimeSampler = UniformTime | LogitNormalTime
WEIGHTINGS = ("uniform", "snr", "dmd2")


@dataclass
class NoisySample:
    """x_t = a_t sg(x0) + s_t eps with its times; a and s already broadcast against x_t."""

    t: Tensor
    x_t: Tensor
    a: Tensor
    s: Tensor


def draw_noisy(x0: Tensor, denoiser: Denoiser, time_sampling: TimeSampler, generator: torch.Generator) -> NoisySample:
    """Diffuse the detached generator sample to a random time (no gradient reaches theta through x_t)."""
    t = time_sampling(x0.shape[0], generator, x0.device).to(x0.dtype)
    eps = batch_randn(tuple(x0.shape), generator, device=x0.device, dtype=x0.dtype)
    a, s = denoiser.schedule.alpha_sigma(t)
    x0 = x0.detach()
    return NoisySample(t, expand_like(a, x0) * x0 + expand_like(s, x0) * eps, expand_like(a, x0), expand_like(s, x0))


def check_weighting(weighting: str) -> str:
    """The weighting name, if it is one of WEIGHTINGS."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: unknown value {weighting!r}; choose one of {list(WEIGHTINGS)}")
    return weighting


def matching_weight(weighting: str, noisy: NoisySample, x0: Tensor, x0_ref: Tensor) -> Tensor:
    """Per-sample x0-unit weight u(t) (docs/algorithm.md §3.3): 'uniform' 1 (DI's public loss, whose x0-unit
    weight is 1); 'snr' a^2 / s^2 (a flat score-unit weight w = 1, growing without bound as t -> 0); 'dmd2'
    1 / mean_dims |x0 - x0_ref| (DMD's normaliser, as in DMD2's code)."""
    if weighting == "uniform":
        return torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
    if weighting == "snr":
        return (noisy.a**2 / noisy.s**2).flatten(1)[:, 0]
    norm = (x0.detach() - x0_ref).abs().flatten(1).mean(1)
    return torch.nan_to_num(1 / norm, nan=0.0, posinf=0.0)


def pseudo_loss(x0: Tensor, direction: Tensor, weight: Tensor) -> Tensor:
    """u <sg(G), x0> per sample: its gradient in x0 is u G, the IKL descent direction."""
    return weight * (direction.detach() * x0).flatten(1).sum(1)


def reward_at(reward: Reward, denoiser: Denoiser, x0: Tensor, cond: Conditioning) -> Tensor:
    """r(Dec(x0), c), differentiable in x0."""
    return reward(denoiser.decode(x0), cond.prompts)


def reward_and_gradient(reward: Reward, denoiser: Denoiser, x0: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
    """r(Dec(x0), c) per sample (detached) and its gradient in x0, by one backward through the reward alone, so that
    the reward's part of the update is known before the generator's backward (docs/algorithm.md §4.5)."""
    leaf = x0.detach().requires_grad_(True)
    with torch.enable_grad():
        value = reward_at(reward, denoiser, leaf, cond)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


def directed_loss(value: Tensor, x0: Tensor, direction: Tensor) -> Tensor:
    """Per sample: equal to `value`, with gradient `direction` in x0 (value + <sg(d), x0 - sg(x0)>)."""
    return value.detach() + (direction.detach() * (x0 - x0.detach())).flatten(1).sum(1)


def update_norm(direction: Tensor, weight: Tensor | float = 1.0) -> float:
    """The batch mean of the per-sample norm of weight * direction: one part of the update in x0 (summed-loss
    scale; divide by the elements per sample for the per-element-mean scale, docs/algorithm.md §4.5)."""
    return (weight * direction.flatten(1).norm(dim=1)).mean().item()


def check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    """`value` if it is > 0 (or >= 0 with allow_zero); else ValueError naming the parameter."""
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value
