"""Diff-Instruct (Luo et al. 2023) and Diff-Instruct++ (Luo 2024) (docs/algorithm.md §4.1, §4.2)."""

from __future__ import annotations

import torch
from torch import Tensor

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import UniformTime
from didr.objectives.common import (
    TimeSampler,
    check_positive,
    check_weighting,
    directed_loss,
    draw_noisy,
    matching_weight,
    pseudo_loss,
    reward_and_gradient,
    update_norm,
)
from didr.rewards.base import Reward


class DI:
    """Integral KL to the (optionally CFG-guided) teacher: L = u(t) <sg(x0_psi - x0_ref), x0>, no reward."""

    def __init__(
        self,
        teacher: Denoiser,
        fake: Denoiser,
        time_sampling: TimeSampler | None = None,
        teacher_guidance: float = 1.0,
        weighting: str = "uniform",
    ):
        self.teacher, self.fake = teacher, fake
        self.time_sampling = time_sampling or UniformTime()
        self.teacher_guidance = teacher_guidance
        self.weighting = check_weighting(weighting)

    def matching(self, x0: Tensor, cond: Conditioning, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The integral-KL pseudo-loss per sample and its logged scalars."""
        noisy = draw_noisy(x0, self.teacher, self.time_sampling, generator)
        with torch.no_grad():
            x0_fake = self.fake.x0(noisy.x_t, noisy.t, cond)
            x0_ref = self.teacher.x0(noisy.x_t, noisy.t, cond, self.teacher_guidance)
        direction = x0_fake - x0_ref
        weight = matching_weight(self.weighting, noisy, x0, x0_ref)
        loss = pseudo_loss(x0, direction, weight)
        logs = {"loss_ikl": loss.mean().item(), "direction_norm": update_norm(direction)}
        return loss, logs | {"update_norm_matching": update_norm(direction, weight)}

    def __call__(self, x0: Tensor, cond: Conditioning, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return self.matching(x0, cond, generator)


class DIPlusPlus(DI):
    """DI++: L = -alpha_rew r(Dec(x0), c) + IKL(p_theta || p_ref^cfg)."""

    def __init__(
        self,
        teacher: Denoiser,
        fake: Denoiser,
        reward: Reward,
        alpha_rew: float,
        time_sampling: TimeSampler | None = None,
        teacher_guidance: float = 1.0,
        weighting: str = "uniform",
    ):
        super().__init__(teacher, fake, time_sampling, teacher_guidance, weighting)
        self.reward, self.alpha_rew = reward, check_positive("alpha_rew", alpha_rew, allow_zero=True)

    def __call__(self, x0: Tensor, cond: Conditioning, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        loss, logs = self.matching(x0, cond, generator)
        reward, reward_grad = reward_and_gradient(self.reward, self.teacher, x0, cond)
        direction = -self.alpha_rew * reward_grad
        logs |= {"reward": reward.mean().item(), "update_norm_reward": update_norm(direction)}
        return loss + directed_loss(-self.alpha_rew * reward, x0, direction), logs
