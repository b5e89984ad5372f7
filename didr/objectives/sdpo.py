"""SDPO: dense reward difference learning over a few-step generator's transitions (docs/algorithm.md §8.4; SOURCED:
SDPO's code, `scripts/train_sdpo.py`, `pipeline_with_logprob_sdpo.py`, `stat_tracking.py`).

Two trajectories share each initial noise. Transition j (j = 0 .. J-1) is credited with the reward of the clean
prediction it leads to, x0_hat_{j+1} (its "dual state"); the reward is queried at the first, the last and the anchor
j* = argmin_j [cos(x0_hat_j, x0_hat_first) + cos(x0_hat_j, x0_hat_last)], and interpolated elsewhere with the cosine
similarities as weights. Returns R_j = r_j + gamma R_{j+1} are standardised per (prompt, step) from a buffer of the
last `buffer_size` returns (the batch's own statistics until it holds `min_count`) and clipped at +-adv_clip. Per
pair and step: max over {unclipped, clipped log-ratio} of [gamma^j (d_1 - d_2) - (A_1 - A_2)]^2, d = log pi_theta -
log pi_old, the clipped d from log pi_theta clamped to log pi_old +- clip_range.
"""

from __future__ import annotations

import torch
from torch import Tensor

from didr.fewstep import Policy, Trajectory
from didr.objectives.grpo import Score


def anchor_weights(x0_hats: Tensor) -> tuple[Tensor, Tensor]:
    """(anchor [B], weights [B, J, 3]): j* and the cosine similarities of each x0_hat_j to the first, anchor, last."""
    flat = x0_hats.flatten(2)
    first = torch.cosine_similarity(flat, flat[:, :1], dim=2)
    last = torch.cosine_similarity(flat, flat[:, -1:], dim=2)
    anchor = (first + last).argmin(1)
    to_anchor = torch.cosine_similarity(flat, flat[torch.arange(len(flat)), anchor][:, None], dim=2)
    return anchor, torch.stack([first, to_anchor, last], 2)


def dense_rewards(queried: Tensor, anchor: Tensor, weights: Tensor) -> Tensor:
    """[B, J]: sum_q w_jq r_q / sum_q w_jq from the rewards (first, anchor, last) [B, 3]; exact at the three steps."""
    rewards = (weights * queried[:, None]).sum(2) / weights.sum(2)
    rows = torch.arange(len(rewards), device=rewards.device)
    rewards[:, 0], rewards[:, -1] = queried[:, 0], queried[:, 2]
    rewards[rows, anchor] = queried[:, 1]
    return rewards


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """R_j = r_j + gamma R_{j+1}, R_J = 0."""
    returns = rewards.clone()
    for j in range(rewards.shape[1] - 2, -1, -1):
        returns[:, j] += gamma * returns[:, j + 1]
    return returns


class StepPromptNormaliser:
    """Per (prompt, step) standardisation from ring buffers of the last `buffer_size` returns (SDPO's tracker).

    The buffers are tensors (values [P, J, buffer_size], counts [P, J]), so a checkpoint captures them; until a
    buffer holds `min_count` returns its rows use the batch's statistics at that step.
    """

    def __init__(self, prompts: int, steps: int, buffer_size: int = 32, min_count: int = 16):
        if not 1 <= min_count <= buffer_size:
            raise ValueError(f"min_count must lie in [1, buffer_size = {buffer_size}], got {min_count}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.values = torch.zeros(prompts, steps, buffer_size, dtype=torch.float64)
        self.counts = torch.zeros(prompts, steps, dtype=torch.int64)

    def update(self, prompt_ids: Tensor, returns: Tensor) -> Tensor:
        """Push the batch's returns [B, J] into their buffers, then standardise them: (R - mean) / (std + 1e-6)."""
        advantages = torch.empty_like(returns)
        values = returns.detach().double().cpu()
        ids = prompt_ids.cpu()
        for prompt in ids.unique():
            rows = ids == prompt
            for step in range(returns.shape[1]):
                new = values[rows, step]
                slots = (self.counts[prompt, step] + torch.arange(len(new))) % self.buffer_size
                self.values[prompt, step, slots] = new
                self.counts[prompt, step] += len(new)
                held = min(int(self.counts[prompt, step]), self.buffer_size)
                pool = self.values[prompt, step, :held] if held >= self.min_count else values[:, step]
                mean, std = pool.mean(), pool.std(unbiased=False) + 1e-6
                advantages[rows.to(returns.device), step] = ((new - mean) / std).to(returns)
        return advantages


def sdpo_pair_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, step_weight: float, clip_range: float
) -> Tensor:
    """Per pair (rows 2i, 2i + 1): max of [w (d_1 - d_2) - (A_1 - A_2)]^2 with d unclipped and clipped (§8.4)."""
    clipped = torch.clamp(log_prob, old_log_prob - clip_range, old_log_prob + clip_range)
    target = advantages[0::2] - advantages[1::2]

    def residual(new: Tensor) -> Tensor:
        ratio = new - old_log_prob
        return (step_weight * (ratio[0::2] - ratio[1::2]) - target) ** 2

    return torch.maximum(residual(log_prob), residual(clipped))


class SDPO:
    """SDPO's settings and its three calls from the RL loop (§8.4): draw (pairs share z), advantages, loss."""

    group_size = 2

    def __init__(
        self, prompts: int, transitions: int, gamma: float = 0.99, clip_range: float = 1e-4, adv_clip: float = 5.0,
        buffer_size: int = 32, min_count: int = 16,
    ):  # fmt: skip
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
        if not clip_range > 0 or not adv_clip > 0:
            raise ValueError(f"clip_range and adv_clip must be > 0, got {clip_range}, {adv_clip}")
        if transitions < 1:
            raise ValueError(
                f"steps: SDPO needs at least one stochastic transition (steps >= 2), got {transitions + 1}"
            )
        self.gamma, self.clip_range, self.adv_clip = gamma, clip_range, adv_clip
        self.normaliser = StepPromptNormaliser(prompts, transitions, buffer_size, min_count)

    def state(self) -> dict[str, Tensor]:
        """The (prompt, step) buffers, restored in place on resume."""
        return {"values": self.normaliser.values, "counts": self.normaliser.counts}

    def check(self, generator: Policy) -> None:
        if generator.eta == 0:
            raise ValueError("eta: SDPO needs a stochastic sampler (eta > 0); eta = 0 has no transition log-density")
        if generator.steps - 1 != self.normaliser.counts.shape[1]:
            raise ValueError(
                f"steps: SDPO was built for {self.normaliser.counts.shape[1]} transitions, the generator "
                f"has {generator.steps - 1}"
            )

    def choose_steps(self, transitions: int, rng: torch.Generator) -> list[int]:
        return list(range(transitions))

    def draw(
        self, groups: int, generator: Policy, steps: list[int], rng: torch.Generator, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Each pair shares z; every transition's noise is its own."""
        shape, device = tuple(generator.sample_shape), next(generator.parameters()).device
        z = torch.randn((groups, *shape), generator=rng, device=device, dtype=dtype).repeat_interleave(2, 0)
        noise = torch.randn((2 * groups, generator.steps - 1, *shape), generator=rng, device=device, dtype=dtype)
        return z, noise

    def advantages(self, trajectory: Trajectory, score: Score, prompt_ids: Tensor) -> tuple[Tensor, dict[str, float]]:
        """[N, J]: clipped per-(prompt, step) standardised returns of the dense rewards."""
        predictions = trajectory.x0_hats[:, 1:]  # the clean prediction each transition leads to
        anchor, weights = anchor_weights(predictions)
        rows = torch.arange(len(predictions), device=predictions.device)
        last = torch.full_like(anchor, predictions.shape[1] - 1)
        queried = torch.stack(
            [score(predictions[rows, index]) for index in (torch.zeros_like(anchor), anchor, last)], 1
        )
        returns = discounted_returns(dense_rewards(queried, anchor, weights), self.gamma)
        advantages = self.normaliser.update(prompt_ids, returns).clamp(-self.adv_clip, self.adv_clip)
        return advantages, {"reward": queried[:, 2].mean().item(), "anchor_step": anchor.double().mean().item()}

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, step: int) -> Tensor:
        return sdpo_pair_loss(log_prob, old_log_prob, advantages, self.gamma**step, self.clip_range)
