"""Group-relative policy optimisation over a few-step generator's transitions (docs/algorithm.md §8.3; SOURCED:
Flow-GRPO, RTDMD's `grpo_trainer.py` / `grpo_utils.py`).

Each prompt is sampled `group_size` times; a trajectory's advantage is its final reward standardised within its group,
A = (r - mean_group) / (std_group + 1e-4), clipped at +-adv_clip, and shared by all its trained transitions. The loss
per transition is PPO's max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(log pi_theta - log pi_old), no KL.
SubGRPO (RTDMD) trains `train_steps` transitions drawn per epoch from the first `step_range`; the members of a group
then share the initial noise and every other transition's noise, so they differ only where the policy is trained.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from didr.fewstep import Policy, Trajectory

Score = Callable[[Tensor], Tensor]
"""score(x0 [N, ...]) -> rewards [N]: the reward of clean predictions of the batch's rows, under their prompts."""


def check_group_size(group_size: int) -> int:
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (advantages compare a group's members), got {group_size}")
    return group_size


def group_advantages(rewards: Tensor, groups: Tensor, eps: float = 1e-4) -> Tensor:
    """(r - mean_g) / (std_g + eps) within each group id (population std); every group needs >= 2 members."""
    advantages = torch.empty_like(rewards)
    for group in groups.unique():
        members = groups == group
        values = rewards[members]
        if values.numel() < 2:
            raise ValueError(f"group_size must be >= 2: group {int(group)} has {values.numel()} member")
        advantages[members] = (values - values.mean()) / (values.std(unbiased=False) + eps)
    return advantages


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """PPO per sample: max(-A rho, -A clip(rho, 1 - clip_range, 1 + clip_range)), rho = exp(log_prob - old)."""
    ratio = (log_prob - old_log_prob).exp()
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))


def draw_group_noise(
    groups: int, group_size: int, generator: Policy, vary: list[int] | None, rng: torch.Generator,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(z [N, ...], noise [N, K-1, ...]) for N = groups x group_size rows, each group's rows adjacent. `vary` None:
    all independent; else the group shares z and every transition's noise except those in `vary`."""
    shape, transitions = tuple(generator.sample_shape), generator.steps - 1
    device = next(generator.parameters()).device
    rows = groups * group_size
    if vary is None:
        z = torch.randn((rows, *shape), generator=rng, device=device, dtype=dtype)
        return z, torch.randn((rows, transitions, *shape), generator=rng, device=device, dtype=dtype)
    z = torch.randn((groups, *shape), generator=rng, device=device, dtype=dtype).repeat_interleave(group_size, 0)
    noise = torch.randn((groups, transitions, *shape), generator=rng, device=device, dtype=dtype)
    noise = noise.repeat_interleave(group_size, 0)
    for k in vary:
        noise[:, k] = torch.randn((rows, *shape), generator=rng, device=device, dtype=dtype)
    return z, noise


class GRPO:
    """GRPO / SubGRPO on the final reward (§8.3); the RL loop (didr/training/rl.py) calls draw, advantages, loss."""

    def __init__(
        self, group_size: int = 16, clip_range: float = 1e-5, adv_clip: float = 5.0,
        train_steps: int | None = None, step_range: int | None = None,
    ):  # fmt: skip
        self.group_size = check_group_size(group_size)
        if not clip_range > 0 or not adv_clip > 0:
            raise ValueError(f"clip_range and adv_clip must be > 0, got {clip_range}, {adv_clip}")
        if train_steps is not None and train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {train_steps}")
        self.clip_range, self.adv_clip = clip_range, adv_clip
        self.train_steps, self.step_range = train_steps, step_range

    def state(self) -> dict[str, Tensor]:
        """No state beyond the policy: GRPO's advantages are the batch's own."""
        return {}

    def check(self, generator: Policy) -> None:
        if generator.steps < 2 or generator.eta == 0:
            raise ValueError(
                f"eta, steps: GRPO needs stochastic transitions, got eta {generator.eta}, steps {generator.steps}"
            )
        limit = self.step_range or generator.steps - 1
        if self.train_steps is not None and not self.train_steps <= limit <= generator.steps - 1:
            raise ValueError(
                f"train_steps, step_range: need train_steps <= step_range <= {generator.steps - 1} transitions, "
                f"got {self.train_steps}, {self.step_range}"
            )

    def choose_steps(self, transitions: int, rng: torch.Generator) -> list[int]:
        """All transitions, or SubGRPO's `train_steps` of the first `step_range`, sorted."""
        if self.train_steps is None:
            return list(range(transitions))
        order = torch.randperm(self.step_range or transitions, generator=rng, device=rng.device)
        return sorted(int(k) for k in order[: self.train_steps])

    def draw(
        self, groups: int, generator: Policy, steps: list[int], rng: torch.Generator, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        return draw_group_noise(
            groups, self.group_size, generator, None if self.train_steps is None else steps, rng, dtype
        )

    def advantages(self, trajectory: Trajectory, score: Score, prompt_ids: Tensor) -> tuple[Tensor, dict[str, float]]:
        """[N, K-1]: each row's group-standardised final reward, clipped, on every transition."""
        rewards = score(trajectory.image)
        groups = torch.arange(len(prompt_ids), device=rewards.device) // self.group_size
        advantages = group_advantages(rewards, groups).clamp(-self.adv_clip, self.adv_clip)
        return advantages[:, None].expand(-1, trajectory.transitions), {"reward": rewards.mean().item()}

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, step: int) -> Tensor:
        return clipped_policy_loss(log_prob, old_log_prob, advantages, self.clip_range)
