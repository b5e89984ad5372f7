"""Reward maximisation with no distribution term: the reward-hacking reference."""

from __future__ import annotations

import torch
from torch import Tensor

from didr.backbones.base import Conditioning, Denoiser
from didr.objectives.common import reward_at
from didr.rewards.base import Reward


class RewardOnly:
    """L = -r(Dec(x0), c)."""

    def __init__(self, teacher: Denoiser, reward: Reward):
        self.teacher, self.reward = teacher, reward

    def __call__(self, x0: Tensor, cond: Conditioning, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        reward = reward_at(self.reward, self.teacher, x0, cond)
        return -reward, {"reward": reward.mean().item()}
