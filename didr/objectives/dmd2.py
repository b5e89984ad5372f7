"""DMD2's distribution-matching loss, optionally reward-augmented (docs/algorithm.md §4.3)."""

from __future__ import annotations

import torch
from torch import Tensor

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import UniformTime, expand_like
from didr.objectives.common import (
    TimeSampler,
    check_positive,
    directed_loss,
    draw_noisy,
    reward_and_gradient,
    update_norm,
)
from didr.rewards.base import Reward


class DMD2:
    """grad = (x0_fake - x0_real) / mean_CHW |x0 - x0_real| (float64, nan_to_num); L = 0.5 ||x0 - sg(x0 - grad)||^2.

    Optional reward term: -lambda r (linear) or lambda ReLU(h - r) (RTDMD's hinge, when `reward_hinge` is set).
    The loss sums over pixels, so its gradient in x0 is `grad` itself: DMD2's mean is CHW times smaller, which Adam
    absorbs and the loop's clip converts; `reward_weight` is on this summed scale (docs/algorithm.md §4.5).
    """

    def __init__(
        self,
        teacher: Denoiser,
        fake: Denoiser,
        time_sampling: TimeSampler | None = None,
        teacher_guidance: float = 1.0,
        reward: Reward | None = None,
        reward_weight: float = 0.0,
        reward_hinge: float | None = None,
    ):
        self.teacher, self.fake = teacher, fake
        self.time_sampling = time_sampling or UniformTime(20 / 999, 980 / 999)
        self.teacher_guidance = teacher_guidance
        self.reward_weight = check_positive("reward_weight", reward_weight, allow_zero=True)
        if reward_weight > 0 and reward is None:
            raise ValueError("reward_weight > 0 needs a reward")
        self.reward, self.reward_hinge = reward, reward_hinge

    def __call__(self, x0: Tensor, cond: Conditioning, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        noisy = draw_noisy(x0, self.teacher, self.time_sampling, generator)
        with torch.no_grad():
            x0_fake = self.fake.x0(noisy.x_t, noisy.t, cond).double()
            x0_real = self.teacher.x0(noisy.x_t, noisy.t, cond, self.teacher_guidance).double()
            norm = (x0.detach().double() - x0_real).abs().flatten(1).mean(1)
            grad = torch.nan_to_num((x0_fake - x0_real) / norm.reshape(-1, *[1] * (x0.dim() - 1))).to(x0.dtype)
        loss = 0.5 * ((x0 - (x0 - grad).detach()) ** 2).flatten(1).sum(1)
        logs = {"loss_dm": loss.mean().item(), "direction_norm": update_norm(grad)}
        logs |= {"update_norm_matching": logs["direction_norm"], "update_norm_reward": 0.0}
        if self.reward is not None and self.reward_weight > 0:
            reward, reward_grad = reward_and_gradient(self.reward, self.teacher, x0, cond)
            logs["reward"] = reward.mean().item()
            penalty = -reward if self.reward_hinge is None else torch.relu(self.reward_hinge - reward)
            acting = torch.ones_like(reward) if self.reward_hinge is None else (reward < self.reward_hinge).to(x0.dtype)
            direction = -self.reward_weight * expand_like(acting, x0) * reward_grad
            loss = loss + directed_loss(self.reward_weight * penalty, x0, direction)
            logs["update_norm_reward"] = update_norm(direction)
        return loss, logs
