"""Estimators of the Diffused Reward Score DRS_t = grad_{x_t} log E_ref[exp(r(x0) / beta) | x_t].

Each estimator returns (DRS in score units, detached; the teacher's guided x0_hat at x_t, detached) so that the
teacher forward pass at x_t serves both the integral-KL target and the proxy. No gradient reaches the generator:
the noisy sample is detached and only grad_{x_t} is taken. Formulas: docs/algorithm.md §5.1 (DRS), §5.4 (DRP),
§5.5 (the curvature-corrected proxy).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import expand_like, solve
from didr.objectives.common import check_positive
from didr.rewards.base import DRSFn, Reward

DRS_MODES = ("tweedie", "k-step", "hybrid", "curvature")
DRSEstimator = Callable[[Tensor, Tensor, Conditioning], tuple[Tensor, Tensor]]


class DiffusedRewardProxy:
    """The Diffused Reward Proxy (docs/algorithm.md §5.4: the idea is DIDR's, these three forms are derived).

    - 'tweedie' (K = 1): DRS ~ (1 / beta) grad_{x_t} r(Dec(D(x_t))).
    - 'k-step': DRS ~ (1 / beta) grad_{x_t} r(Dec(D_K(x_t))), D_K a differentiable K-step DDIM / Euler solve.
    - 'hybrid': DRS ~ (1 / beta) J_1^T grad r(Dec(sg(D_K(x_t)))), J_1 the one-step denoiser's Jacobian.
    - 'curvature' (§5.5): DRS ~ J^T y with (I + H C_t / beta) y = g / beta, C_t = (s^2 / a) J, g = grad r and
      H = -Hess r at D(x_t); `steps` is the number of GMRES iterations (exact after d of them in d dimensions).
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
        self.fallback_fraction = 0.0

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
        # the curvature mode differentiates the teacher twice: attention must use the twice-differentiable kernel
        attention = sdpa_kernel(SDPBackend.MATH) if self.mode == "curvature" else nullcontext()
        with torch.enable_grad(), attention:
            x0_first = self._x0(xd, t, cond)

            def x0_fn(x: Tensor, tt: Tensor) -> Tensor:
                return self._x0(x, tt, cond)

            if self.mode == "curvature":
                drs = self._curvature_corrected(xd, x0_first, t, cond)
                return drs.detach(), x0_first.detach()
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

    def _curvature_corrected(self, xd: Tensor, x0_first: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """J^T y with (I + H C_t / beta) y = g / beta (docs/algorithm.md §5.5), by GMRES on Jacobian-vector products
        of the denoiser (C_t v = (s^2 / a) J v, a double backward through the retained graph of D(x_t)) and
        Hessian-vector products of the reward. A sample whose solve is not finite or grows past
        CURVATURE_GROWTH_LIMIT ||g|| / beta (a reward convex enough to make the system near-singular) falls back to
        Tweedie's y = g / beta; `fallback_fraction` records the share of the last batch that did."""
        x0_leaf = x0_first.detach().requires_grad_(True)
        (reward_grad,) = torch.autograd.grad(self._reward_of_x0(x0_leaf, cond).sum(), x0_leaf, create_graph=True)
        tweedie = reward_grad.detach().flatten(1) / self.beta
        if not reward_grad.requires_grad:  # a reward linear in x0: H = 0, the system is the identity, y = g / beta
            self.fallback_fraction = 0.0
            (drs,) = torch.autograd.grad(x0_first, xd, grad_outputs=tweedie.view(x0_first.shape))
            return drs
        probe = torch.zeros_like(x0_first, requires_grad=True)
        (jacobian_t_probe,) = torch.autograd.grad(x0_first, xd, grad_outputs=probe, create_graph=True)
        a, s = self.teacher.schedule.alpha_sigma(t.to(xd.dtype))
        cov_scale = expand_like(s**2 / a, xd)
        shape = x0_first.shape

        def system(v: Tensor) -> Tensor:
            (jv,) = torch.autograd.grad(jacobian_t_probe, probe, grad_outputs=v.view(shape), retain_graph=True)
            (hess_cov_v,) = torch.autograd.grad(reward_grad, x0_leaf, grad_outputs=cov_scale * jv, retain_graph=True)
            return v - hess_cov_v.flatten(1) / self.beta  # H = -Hess r

        y = batched_gmres(system, tweedie, self.steps)
        limit = CURVATURE_GROWTH_LIMIT * tweedie.norm(dim=1)
        failed = ~torch.isfinite(y).all(dim=1) | (y.norm(dim=1) > limit)
        self.fallback_fraction = failed.double().mean().item()
        y = torch.where(failed[:, None], tweedie, y)
        (drs,) = torch.autograd.grad(x0_first, xd, grad_outputs=y.view(shape))
        return drs


CURVATURE_GROWTH_LIMIT = 10.0
"""The curvature-corrected y may exceed Tweedie's g / beta by at most this factor in norm; beyond it the system
(I + H C_t / beta) is treated as near-singular (a reward too convex at D(x_t)) and the sample falls back to Tweedie."""


def batched_gmres(apply: Callable[[Tensor], Tensor], rhs: Tensor, iterations: int) -> Tensor:
    """Solve A y = rhs for each row of rhs [B, n] by `iterations` steps of GMRES: y minimises ||rhs - A y|| over
    the Krylov space span{rhs, A rhs, ..., A^(k-1) rhs} (Arnoldi with modified Gram-Schmidt, then the small
    least-squares problem by pseudo-inverse). `apply` maps [B, n] to [B, n] row by row. A row whose Krylov space
    closes early (an invariant subspace: its solution is already exact) stops growing it."""
    batch, k = rhs.shape[0], iterations
    rhs_norm = rhs.norm(dim=1)
    basis = [rhs / torch.where(rhs_norm > 0, rhs_norm, 1)[:, None]]
    hessenberg = rhs.new_zeros(batch, k + 1, k)
    tolerance = torch.finfo(rhs.dtype).eps ** 0.5
    for j in range(k):
        w = apply(basis[j])
        scale = w.norm(dim=1)
        for i, v in enumerate(basis):
            h = (w * v).sum(1)
            hessenberg[:, i, j] = h
            w = w - h[:, None] * v
        w_norm = w.norm(dim=1)
        open_rows = w_norm > tolerance * scale
        hessenberg[:, j + 1, j] = torch.where(open_rows, w_norm, 0)
        basis.append(torch.where(open_rows[:, None], w / torch.where(open_rows, w_norm, 1)[:, None], 0))
    target = rhs.new_zeros(batch, k + 1, 1)
    target[:, 0, 0] = rhs_norm
    coefficients = (torch.linalg.pinv(hessenberg) @ target)[..., 0]
    return torch.einsum("bk,kbn->bn", coefficients, torch.stack(basis[:k]))


class SuppliedDRS:
    """A user-supplied DRS (for example the exact one of an analytic problem) with the teacher's target beside it."""

    def __init__(self, teacher: Denoiser, drs: DRSFn, guidance: float = 1.0):
        self.teacher, self.drs, self.guidance = teacher, drs, guidance

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            x0_ref = self.teacher.x0(x_t, t, cond, self.guidance)
            return self.drs(x_t, t, cond).detach(), x0_ref
