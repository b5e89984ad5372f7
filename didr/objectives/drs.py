"""Estimators of the Diffused Reward Score DRS_t = grad_{x_t} log E_ref[exp(r(x0) / beta) | x_t].

Each estimator returns (DRS in score units, detached; the teacher's guided x0_hat at x_t, detached) so that the
teacher forward pass at x_t serves both the integral-KL target and the proxy. No gradient reaches the generator:
the noisy sample is detached and only grad_{x_t} is taken. Formulas: docs/algorithm.md §5.1 (DRS), §5.4 (DRP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import solve
from didr.objectives.common import check_positive
from didr.rewards.base import DRSFn, Reward

DRS_MODES = ("tweedie", "k-step", "hybrid")
DRSEstimator = Callable[[Tensor, Tensor, Conditioning], tuple[Tensor, Tensor]]


class DiffusedRewardProxy:
    """The Diffused Reward Proxy (docs/algorithm.md §5.4: the idea is DIDR's, these three forms are derived).

    - 'tweedie' (K = 1): DRS ~ (1 / beta) grad_{x_t} r(Dec(D(x_t))).
    - 'k-step': DRS ~ (1 / beta) grad_{x_t} r(Dec(D_K(x_t))), D_K a differentiable K-step DDIM / Euler solve.
    - 'hybrid': DRS ~ (1 / beta) J_1^T grad r(Dec(sg(D_K(x_t)))), J_1 the one-step denoiser's Jacobian.
    `checkpoint` recomputes the K teacher calls, the decoder and the reward in the backward pass.
    """

    def __init__(
        self,
        teacher: Denoiser,
        reward: Reward,
        beta: float,
        mode: str = "tweedie",
        steps: int = 1,
        guidance: float = 1.0,
        checkpoint: bool = False,
    ):
        if mode not in DRS_MODES:
            raise ValueError(f"drs: unknown mode {mode!r}; choose one of {list(DRS_MODES)} or pass a callable")
        if steps < 1:
            raise ValueError(f"drs_steps (K) must be >= 1, got {steps}")
        if mode == "tweedie" and steps != 1:
            raise ValueError(f"drs_steps must be 1 for the 'tweedie' proxy (use 'k-step' for K > 1), got {steps}")
        self.teacher, self.reward, self.beta = teacher, reward, check_positive("beta", beta)
        self.mode, self.steps, self.guidance, self.checkpoint = mode, steps, guidance, checkpoint

    def _x0(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.teacher.x0(x, t, cond, self.guidance)

    def _reward_of_x0(self, x0: Tensor, cond: Conditioning) -> Tensor:
        def score(x: Tensor) -> Tensor:
            return self.reward(self.teacher.decode(x), cond.prompts)

        if self.checkpoint:
            return grad_checkpoint(score, x0, use_reentrant=False)
        return score(x0)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        xd = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            x0_first = self._x0(xd, t, cond)

            def x0_fn(x: Tensor, tt: Tensor) -> Tensor:
                return self._x0(x, tt, cond)

            if self.mode == "hybrid":
                with torch.no_grad():
                    x0_sharp = solve(x0_fn, xd, t, self.steps, self.teacher.schedule, first_x0=x0_first.detach())
                x0_sharp.requires_grad_(True)
                (reward_grad,) = torch.autograd.grad(self._reward_of_x0(x0_sharp, cond).sum(), x0_sharp)
                (drs,) = torch.autograd.grad(x0_first, xd, grad_outputs=reward_grad)
            else:
                x0_end = solve(
                    x0_fn, xd, t, self.steps, self.teacher.schedule, first_x0=x0_first, checkpoint=self.checkpoint
                )
                (drs,) = torch.autograd.grad(self._reward_of_x0(x0_end, cond).sum(), xd)
        return drs.detach() / self.beta, x0_first.detach()


class SuppliedDRS:
    """A user-supplied DRS (for example the exact one of an analytic problem) with the teacher's target beside it."""

    def __init__(self, teacher: Denoiser, drs: DRSFn, guidance: float = 1.0):
        self.teacher, self.drs, self.guidance = teacher, drs, guidance

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            x0_ref = self.teacher.x0(x_t, t, cond, self.guidance)
            return self.drs(x_t, t, cond).detach(), x0_ref
