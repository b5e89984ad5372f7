"""DIDR: integral KL to the reward-tilted teacher p*_t ~ p_ref,t h_t (docs/algorithm.md §5).

Target denoiser x0_hat* = x0_hat_ref + gamma(t) 1[t <= t_max] (s^2 / a) DRS_t; descent direction
G = x0_hat_psi - x0_hat*, pseudo-loss u(t) <sg(G), x0>. With weighting 'dmd2' (the default) and DRS = 0 it is
exactly DMD2's distribution-matching gradient; as beta -> infinity the DRS vanishes and it is the IKL baseline
of its weighting ('uniform': DI; 'dmd2': DMD2 without reward; docs/algorithm.md §5.2, §5.3).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import Schedule, UniformTime, expand_like
from didr.objectives.common import (
    TimeSampler,
    check_weighting,
    draw_noisy,
    matching_weight,
    pseudo_loss,
    reward_at,
    update_norm,
)
from didr.objectives.drs import DiffusedRewardProxy, SuppliedDRS
from didr.rewards.base import DRSFn, Reward

Damping = Callable[[Tensor], Tensor]
TIME_BINS = (0.0, 0.5, 1.0)
"""The edges of the t bins over which the DRS shift is compared with the matching direction: below and above the
toy world's drs_t_max. Finer bins at low t are not reproducible: there x0_psi - x0_ref is a small difference of two
nearly equal predictions, so its norm moves by 1e-5 relative with the 6e-8 drift of the weights between micro-batch
splits (tests/test_distributed.py)."""


def signal_damping(schedule: Schedule, power: float) -> Damping:
    """gamma(t) = (a_t^2 / (a_t^2 + s_t^2))^power (§5.5): the signal's share of x_t, so that the DRS fades as the
    noise takes over (for VP a_t^2 itself; power 0 is no damping)."""

    def gamma(t: Tensor) -> Tensor:
        a, s = schedule.alpha_sigma(t)
        return (a**2 / (a**2 + s**2)) ** power

    return gamma


def norms_by_time(t: Tensor, shift: Tensor, matching: Tensor, weight: Tensor) -> dict[str, float]:
    """Per bin of TIME_BINS, the batch means of 1[t in bin] u ||(s^2 / a) gamma DRS|| and 1[t in bin] u ||x0_psi -
    x0_ref||, the reward and matching parts of the update at those noise levels (§5.2, docs/algorithm.md §4.5): summed
    over any steps, their quotient is how far the reward tilts the target against the matching direction there
    (means, not ratios, so that micro-batches, processes and steps add up; over the bins they sum to the totals)."""
    shift_norm, matching_norm = weight * shift.flatten(1).norm(dim=1), weight * matching.flatten(1).norm(dim=1)
    logs = {}
    for low, high in itertools.pairwise(TIME_BINS):
        inside = ((t >= low) & ((t < high) if high < 1 else (t <= high))).to(shift.dtype)
        logs[f"drs_shift_t{low:.2f}-{high:.2f}"] = (inside * shift_norm).mean().item()
        logs[f"matching_t{low:.2f}-{high:.2f}"] = (inside * matching_norm).mean().item()
    return logs


class DIDR:
    """Diff-Instruct with Diffused Reward.

    `drs` is a proxy mode ('tweedie', 'k-step', 'hybrid', 'curvature', estimated from `reward` / `beta`; `drs_steps`
    is K, or the curvature mode's solver iterations) or a callable
    (x_t, t, cond) -> DRS_t (for example an exact closed form). `t_max` caps the DRS to t <= t_max and `gamma`
    damps it by gamma(t); both make the target deviate from the exact tilt, deliberately (docs/algorithm.md §5.5).
    """

    def __init__(
        self,
        teacher: Denoiser,
        fake: Denoiser,
        reward: Reward | None = None,
        beta: float = 1.0,
        drs: str | DRSFn = "tweedie",
        drs_steps: int = 1,
        t_max: float = 0.9,
        gamma: Damping | None = None,
        time_sampling: TimeSampler | None = None,
        teacher_guidance: float = 1.0,
        weighting: str = "dmd2",
        checkpoint: bool = False,
    ):
        if not 0 < t_max <= 1:
            raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
        self.estimator: SuppliedDRS | DiffusedRewardProxy
        if callable(drs):
            self.estimator = SuppliedDRS(teacher, drs, teacher_guidance)
        else:
            if reward is None:
                raise ValueError(f"drs={drs!r} estimates the DRS from a reward: pass reward=")
            self.estimator = DiffusedRewardProxy(teacher, reward, beta, drs, drs_steps, teacher_guidance, checkpoint)
        self.teacher, self.fake, self.t_max, self.gamma, self.reward = teacher, fake, t_max, gamma, reward
        self.time_sampling = time_sampling or UniformTime()
        self.weighting = check_weighting(weighting)

    def __call__(self, x0: Tensor, cond: Conditioning, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        noisy = draw_noisy(x0, self.teacher, self.time_sampling, generator)
        drs, x0_ref = self.estimator(noisy.x_t, noisy.t, cond)
        with torch.no_grad():
            x0_fake = self.fake.x0(noisy.x_t, noisy.t, cond)
        damping = (noisy.t <= self.t_max).to(x0.dtype)
        if self.gamma is not None:
            damping = damping * self.gamma(noisy.t)
        shift = expand_like(damping, x0) * noisy.s**2 / noisy.a * drs
        direction = x0_fake - (x0_ref + shift)
        weight = matching_weight(self.weighting, noisy, x0, x0_ref)
        loss = pseudo_loss(x0, direction, weight)
        logs = {
            "loss_ikl": loss.mean().item(),
            "direction_norm": update_norm(direction),
            "drs_norm": update_norm(shift),
            "update_norm_matching": update_norm(x0_fake - x0_ref, weight),
            "update_norm_reward": update_norm(shift, weight),
        }
        logs |= norms_by_time(noisy.t, shift, x0_fake - x0_ref, weight)
        if isinstance(self.estimator, DiffusedRewardProxy) and self.estimator.mode == "curvature":
            logs["drs_fallback"] = self.estimator.fallback_fraction  # share of the batch that fell back to Tweedie
        if self.reward is not None:  # logged only, like the other methods' reward at the clean image
            with torch.no_grad():
                logs["reward"] = reward_at(self.reward, self.teacher, x0.detach(), cond).mean().item()
        return loss, logs
