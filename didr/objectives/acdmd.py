"""AC-DMD: distribution matching at the intermediate states of a few-step flow generator (docs/algorithm.md §8.2;
SOURCED: RTDMD's code, `rtdmd/trainers/ac_dmd_utils.py`, `ac_dmd_mixin.py`).

A state x_s of the generator's trajectory is re-noised to t > s by x_t = A x_s + sigma n, A = (1 - t) / (1 - s),
sigma^2 = t^2 - A^2 s^2, so that a forward marginal at s becomes the forward marginal at t. The fake score regresses
v* = -x_s / (1 - s) + [t + (1 - t) s^2 / (1 - s)^2] n / sigma, which is -(x_t + t S(x_t | x_s)) / (1 - t) with
S(x_t | x_s) = -n / sigma: denoising score matching from x_s, so E[v* | x_t] is the exact velocity at t. Teacher and
fake are stepped back from t to s by the generator's CPS transition with shared noise; the generator moves x_s along
DMD2's normalised difference of the two (at s = 0 exactly DMD2's direction, §4.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import UniformTime, expand_like, flow_velocity_from_x0
from didr.fewstep import check_sampler, transition
from didr.objectives.common import TimeSampler, check_positive


def renoise_coefficients(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(A, sigma) with A = (1 - t) / (1 - s), sigma = sqrt(t^2 - A^2 s^2), per sample, for 0 <= s < t <= 1."""
    scale = (1 - t) / (1 - s)
    return scale, (t**2 - scale**2 * s**2).clamp(min=0).sqrt()


def renoise(x_s: Tensor, s: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = A x_s + sigma n."""
    scale, sigma = renoise_coefficients(s, t)
    return expand_like(scale, x_s) * x_s + expand_like(sigma, x_s) * noise


def fake_velocity_target(x_s: Tensor, s: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """v* = -x_s / (1 - s) + [t + (1 - t) s^2 / (1 - s)^2] n / sigma."""
    _, sigma = renoise_coefficients(s, t)
    coefficient = (t + (1 - t) * s**2 / (1 - s) ** 2) / sigma
    return -x_s / expand_like(1 - s, x_s) + expand_like(coefficient, x_s) * noise


class ACDMD:
    """The AC-DMD generator loss at (x_s, s) and the fake score's loss on the same states (§8.2).

    `__call__(x0, cond, rng)` is the loss at s = 0, so `didr.training.loop.align` can run it on final images.
    The re-noising time is t = s + (1 - s) u with u from `time_sampling`.
    """

    def __init__(
        self,
        teacher: Denoiser,
        fake: Denoiser,
        time_sampling: TimeSampler | None = None,
        teacher_guidance: float = 1.0,
        eta: float = 0.9,
        consistency_weight: float = 0.01,
        consistency_gap: float = 0.05,
    ):
        if teacher.schedule.kind != "flow":
            raise ValueError(f"acdmd needs a flow teacher (RTDMD's CPS transitions), got {teacher.schedule.kind!r}")
        check_sampler("cps", eta, teacher.schedule)
        self.teacher, self.fake, self.eta = teacher, fake, eta
        self.time_sampling = time_sampling or UniformTime(20 / 999, 980 / 999)
        self.teacher_guidance = teacher_guidance
        self.consistency_weight = check_positive("consistency_weight", consistency_weight, allow_zero=True)
        self.consistency_gap = check_positive("consistency_gap", consistency_gap)

    def _draw(self, x_s: Tensor, s: Tensor, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """(t, n): the re-noising time above s and its noise (t first, as DMD2's draw_noisy)."""
        u = self.time_sampling(x_s.shape[0], rng, x_s.device).to(x_s.dtype)
        noise = torch.randn(x_s.shape, generator=rng, device=x_s.device, dtype=x_s.dtype)
        return s + (1 - s) * u, noise

    def _back_to_s(self, x_t: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor, noise: Tensor) -> Tensor:
        mean, std = transition(x_t, x0_hat, t, s, self.teacher.schedule, "cps", self.eta)
        return mean + expand_like(std, mean) * noise

    def generator_loss(
        self, x_s: Tensor, s: Tensor, cond: Conditioning, rng: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        """0.5 ||x_s - sg(x_s - G)||^2 per sample, G = (x_s^fake - x_s^real) / mean_dims |x_s - x_s^real| (float64)."""
        t, noise = self._draw(x_s, s, rng)
        shared = torch.randn(x_s.shape, generator=rng, device=x_s.device, dtype=x_s.dtype)
        with torch.no_grad():
            x_t = renoise(x_s.detach(), s, t, noise)
            real = self._back_to_s(x_t, self.teacher.x0(x_t, t, cond, self.teacher_guidance), t, s, shared).double()
            fake = self._back_to_s(x_t, self.fake.x0(x_t, t, cond), t, s, shared).double()
            norm = (x_s.detach().double() - real).abs().flatten(1).mean(1)
            grad = torch.nan_to_num((fake - real) / expand_like(norm, real)).to(x_s.dtype)
        loss = 0.5 * ((x_s - (x_s - grad).detach()) ** 2).flatten(1).sum(1)
        return loss, {"loss_acdmd": loss.mean().item(), "direction_norm": grad.flatten(1).norm(dim=1).mean().item()}

    def __call__(self, x0: Tensor, cond: Conditioning, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The generator loss on final images (s = 0): DMD2's loss."""
        return self.generator_loss(x0, torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype), cond, generator)

    def fake_loss(
        self, x_s: Tensor, s: Tensor, cond: Conditioning, rng: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        """mean_dims ||v_psi(x_t, t) - v*||^2 + consistency_weight mean_dims ||x0_psi(x_t', t') - x0_psi(x_t, t)||^2,
        x_t' one CPS step of the fake's own (detached) prediction from t down to t' = max(s, t - gap u')."""
        x_s = x_s.detach()
        t, noise = self._draw(x_s, s, rng)
        x_t = renoise(x_s, s, t, noise)
        x0_hat = self.fake.x0(x_t, t, cond)
        velocity = flow_velocity_from_x0(x_t, x0_hat, expand_like(t, x_t))
        matching = ((velocity - fake_velocity_target(x_s, s, t, noise)) ** 2).flatten(1).mean(1)
        logs = {"loss_fake": matching.mean().item()}
        if self.consistency_weight == 0:
            return matching, logs
        gap = self.consistency_gap * torch.rand(x_s.shape[0], generator=rng, device=x_s.device, dtype=x_s.dtype)
        t_prime = torch.maximum(s, t - gap)
        step_noise = torch.randn(x_s.shape, generator=rng, device=x_s.device, dtype=x_s.dtype)
        with torch.no_grad():
            x_prime = self._back_to_s(x_t, x0_hat, t, t_prime, step_noise)
        consistency = ((self.fake.x0(x_prime, t_prime, cond) - x0_hat) ** 2).flatten(1).mean(1)
        logs["loss_consistency"] = consistency.mean().item()
        return matching + self.consistency_weight * consistency, logs
