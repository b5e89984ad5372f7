"""The policy-gradient pieces (GRPO, SubGRPO, SDPO) against an analytic problem, through the RL loop (issue 16,
proofs of the policy-gradient pieces; docs/algorithm.md §8.3-§8.5).

The policy: x_{j+1} = x_j + theta_j + sigma_j n_j from a fixed start, L = 3 Gaussian transitions, so the outcome is
x_L ~ N(start + sum_j theta_j, sum_j sigma_j^2 I). Under the quadratic reward r(x) = -0.5 (x - m)^T Q (x - m),
E r = -0.5 (mu - m)^T Q (mu - m) - 0.5 tr(Q) sum_j sigma_j^2: the optimum is sum_j theta_j = m - start, where
E r* = -0.5 tr(Q) sum_j sigma_j^2.
"""

import pytest
import torch
from torch import nn

from didr.backbones.base import Conditioning
from didr.fewstep import Trajectory, gaussian_log_density
from didr.objectives.grpo import GRPO, check_group_size, clipped_policy_loss, group_advantages
from didr.objectives.sdpo import (
    SDPO,
    StepPromptNormaliser,
    anchor_weights,
    dense_rewards,
    discounted_returns,
    sdpo_pair_loss,
)
from didr.rewards.analytic import QuadraticReward
from didr.training.rl import train_policy

START = torch.tensor([4.0, 3.0], dtype=torch.float64)
CENTRE = torch.tensor([5.0, 4.0], dtype=torch.float64)
Q = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
SIGMAS = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
REWARD = QuadraticReward(CENTRE, Q)
PROMPTS = Conditioning([""])


class DriftPolicy(nn.Module):
    """x_{j+1} ~ N(x_j + theta_j, sigma_j^2 I) from START; x0_hat_j = x_j + sum_{k >= j} theta_k = E[x_L | x_j]."""

    eta = 1.0

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(len(SIGMAS), 2, dtype=torch.float64))
        self.steps, self.sample_shape = len(SIGMAS) + 1, (2,)

    def sample(self, z, cond, rng=None, noise=None):
        theta = self.theta.detach()
        x = START.expand(len(z), 2)
        states, predictions, means, log_probs = [x], [x + theta.sum(0)], [], []
        for j, sigma in enumerate(SIGMAS):
            mean = x + theta[j]
            x = mean + sigma * noise[:, j]
            states.append(x)
            predictions.append(x + theta[j + 1 :].sum(0))
            means.append(mean)
            log_probs.append(gaussian_log_density(x, mean, sigma.expand(len(z))))
        return Trajectory(
            torch.linspace(1, 0.25, 4), torch.stack(states, 1), torch.stack(predictions, 1), torch.stack(means, 1),
            SIGMAS.expand(len(z), -1), noise, torch.stack(log_probs, 1),
        )  # fmt: skip

    def log_prob(self, x, x_next, k, cond, reduce="mean"):
        return gaussian_log_density(x_next, x + self.theta[k], SIGMAS[k].expand(len(x)), reduce)

    def decode(self, x0):
        return x0


def expected_reward(policy):
    gap = START + policy.theta.detach().sum(0) - CENTRE
    return (-0.5 * gap @ Q @ gap - 0.5 * Q.trace() * (SIGMAS**2).sum()).item()


OPTIMUM = (-0.5 * Q.trace() * (SIGMAS**2).sum()).item()


def test_group_advantages_have_zero_mean_and_unit_spread_per_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0, -1.0, -1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    advantages = group_advantages(rewards, groups)
    for g in range(3):
        assert advantages[groups == g].mean().abs() < 1e-6
    torch.testing.assert_close(advantages[:3], torch.tensor([-1.0, 0.0, 1.0]) * (1.5**0.5) / (1 + 1e-4 * 1.5**0.5))
    torch.testing.assert_close(advantages[6:], torch.zeros(2))  # equal rewards: no signal, no division by zero
    with pytest.raises(ValueError, match=r"^group_size"):
        group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"^group_size"):
        check_group_size(1)
    with pytest.raises(ValueError, match=r"^group_size"):
        GRPO(group_size=1)


def test_clipped_policy_loss_is_ppos():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss = clipped_policy_loss(new, old, advantages, clip_range=0.2)
    # positive advantage: the gain stops at ratio 1.2; negative: the loss is not lowered below ratio 0.8
    torch.testing.assert_close(loss, torch.tensor([-1.2, -0.5, 1.5, 0.8]))


def test_sdpo_dense_rewards_returns_and_normaliser():
    predictions = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]]])
    anchor, weights = anchor_weights(predictions)
    assert anchor.item() == 2  # cos to first 0, to last 0.6: the least similar to both ends
    rewards = dense_rewards(torch.tensor([[1.0, 2.0, 3.0]]), anchor, weights)
    cosines = torch.tensor([0.6, 0.8, 0.96])  # step 1 against first, anchor, last
    torch.testing.assert_close(rewards[0, 1], (cosines * torch.tensor([1.0, 2.0, 3.0])).sum() / cosines.sum())
    torch.testing.assert_close(rewards[0, [0, 2, 3]], torch.tensor([1.0, 2.0, 3.0]))
    returns = discounted_returns(torch.tensor([[1.0, 1.0, 1.0]]), 0.5)
    torch.testing.assert_close(returns, torch.tensor([[1.75, 1.5, 1.0]]))
    normaliser = StepPromptNormaliser(prompts=2, steps=1, buffer_size=4, min_count=3)
    first = normaliser.update(torch.tensor([0, 0, 1, 1]), torch.tensor([[1.0], [3.0], [5.0], [7.0]]))
    batch = torch.tensor([1.0, 3.0, 5.0, 7.0])  # 2 per prompt < min_count: the batch's statistics
    torch.testing.assert_close(first[:, 0], (batch - batch.mean()) / (batch.std(unbiased=False) + 1e-6))
    second = normaliser.update(torch.tensor([0, 0, 0]), torch.tensor([[2.0], [4.0], [6.0]]))
    held = torch.tensor([6.0, 3.0, 2.0, 4.0])  # ring of 4: 1 was overwritten by 6
    torch.testing.assert_close(second[:, 0], (torch.tensor([2.0, 4.0, 6.0]) - 3.75) / (held.std(unbiased=False) + 1e-6))
    assert normaliser.counts.tolist() == [[5], [2]]


def test_sdpo_pair_loss_clips_the_log_ratio():
    old = torch.zeros(4, dtype=torch.float64)
    new = torch.tensor([0.5, 0.0, 1e-5, 0.0], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    loss = sdpo_pair_loss(new, old, advantages, step_weight=0.5, clip_range=1e-4)
    # pair 0: unclipped (0.25 - 2)^2, clipped (0.5e-4 - 2)^2 is larger and has no gradient
    torch.testing.assert_close(loss, torch.tensor([(0.5e-4 - 2) ** 2, (0.5 * 1e-5) ** 2], dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), new)
    # pair 0's clipped member has no gradient, its partner inside the range keeps its own; pair 1: both branches agree
    assert grad[0] == 0 and grad[1].item() == pytest.approx(2 - 0.5e-4)
    assert grad[2].item() == pytest.approx(5e-6) and grad[3].item() == pytest.approx(-5e-6)


def train(method, groups, epochs=200, lr=0.02):
    """Train from theta = 0; returns the policy, E r before, the history and the outcome mean averaged over the last
    third of the epochs (Polyak averaging: removes the jitter of constant-size Adam steps)."""
    policy = DriftPolicy()
    before, means = expected_reward(policy), []
    result = train_policy(
        policy, method, REWARD, PROMPTS, epochs=epochs, groups=groups, lr=lr, adam_betas=(0.9, 0.99), grad_clip=None,
        on_epoch=lambda epoch, logs: means.append(START + policy.theta.detach().sum(0)),
    )  # fmt: skip
    return policy, before, result.history, torch.stack(means[-epochs // 3 :]).mean(0)


def check_landing(policy, before, history, averaged):
    """The closed form: the outcome mean lands on m within 0.05 per coordinate (it starts 1.0 away), so E r lands
    within 0.005 of E r* (from a gap of 1.55); the final iterate is within 0.15; the sampled reward rises by > 0.3
    (first 20 epochs against the last 20)."""
    torch.testing.assert_close(averaged, CENTRE, atol=0.05, rtol=0)
    gap = averaged - CENTRE
    assert before - OPTIMUM < -1.5 and (-0.5 * gap @ Q @ gap).item() > -0.005
    torch.testing.assert_close(START + policy.theta.detach().sum(0), CENTRE, atol=0.15, rtol=0)
    assert sum(row["reward"] for row in history[-20:]) / 20 > sum(row["reward"] for row in history[:20]) / 20 + 0.3


@pytest.mark.parametrize(
    "method",
    [GRPO(group_size=16, clip_range=0.2), GRPO(group_size=16, clip_range=0.2, train_steps=2, step_range=3)],
    ids=["grpo", "subgrpo"],
)
def test_grpo_lands_on_the_closed_form_optimum(method):
    check_landing(*train(method, groups=8))


def test_sdpo_lands_on_the_closed_form_optimum():
    check_landing(*train(SDPO(prompts=1, transitions=3), groups=32))


def test_sdpo_needs_a_stochastic_sampler():
    policy = DriftPolicy()
    policy.eta = 0.0
    with pytest.raises(ValueError, match=r"^eta"):
        train_policy(policy, SDPO(prompts=1, transitions=3), REWARD, PROMPTS, epochs=1, groups=2)
    with pytest.raises(ValueError, match=r"^steps"):
        SDPO(prompts=1, transitions=0)
