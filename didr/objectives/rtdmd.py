"""RTDMD's two stages as one method (docs/algorithm.md §8.7; SOURCED: RTDMD `configs/cold_start/sd35m.yaml`,
`configs/rtdmd/sd35m.yaml`, `rtdmd/trainers/rtdmd_trainer.py`).

Stage 1 (`acdmd_steps` steps; all steps when there is no `grpo`) is AC-DMD (§8.2): the fake score and the generator
train at a state x_s of a random stop step. Stage 2 is an epoch of SubGRPO (§8.3) on the policy's early stochastic
transitions plus, at the deterministic last step, the loss `last_step_loss`:
acdmd_weight L_AC-DMD(x0_hat, s = 0) + reward_weight ReLU(reward_margin - r(x0_hat)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from didr.backbones.base import Conditioning
from didr.objectives.acdmd import ACDMD
from didr.objectives.common import check_positive, reward_at
from didr.objectives.grpo import GRPO
from didr.rewards.base import Reward


class RTDMD:
    """AC-DMD for the first `acdmd_steps` steps, then SubGRPO with the last-step losses (§8.7); without `grpo` the
    whole run is AC-DMD (the grid's `acdmd`, RTDMD's stage 1 alone)."""

    def __init__(
        self,
        acdmd: ACDMD,
        grpo: GRPO | None = None,
        reward: Reward | None = None,
        reward_weight: float = 0.0,
        reward_margin: float = 3.0,
        acdmd_weight: float = 1e-3,
        acdmd_steps: int = 0,
    ):
        self.acdmd, self.grpo, self.reward = acdmd, grpo, reward
        self.reward_weight = check_positive("reward_weight", reward_weight, allow_zero=True)
        self.acdmd_weight = check_positive("acdmd_weight", acdmd_weight, allow_zero=True)
        if acdmd_steps < 0:
            raise ValueError(f"acdmd_steps must be >= 0, got {acdmd_steps}")
        if grpo is not None and reward is None:
            raise ValueError("rtdmd's stage 2 needs a reward")
        self.reward_margin, self.acdmd_steps = reward_margin, acdmd_steps

    def stage(self, step: int) -> int:
        """1 (AC-DMD) before `acdmd_steps` or without a policy term, else 2 (SubGRPO and the last-step losses)."""
        return 1 if self.grpo is None or step < self.acdmd_steps else 2

    def last_step_loss(self, x0: Tensor, cond: Conditioning, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Per sample: acdmd_weight L_AC-DMD(x0, s = 0) + reward_weight ReLU(reward_margin - r(x0)) on the final
        images x0 (the deterministic last step's prediction, with gradients)."""
        matching, logs = self.acdmd(x0, cond, rng)
        loss = self.acdmd_weight * matching
        if self.reward is not None and self.reward_weight > 0:
            reward = reward_at(self.reward, self.acdmd.teacher, x0, cond)
            hinge = torch.relu(self.reward_margin - reward)
            logs["loss_hinge"] = hinge.mean().item()
            loss = loss + self.reward_weight * hinge
        return loss, logs
