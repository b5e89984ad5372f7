"""A K-step generator with stochastic Gaussian transitions and their log-densities (docs/algorithm.md §8.1).

Times t_0 > t_1 > ... > t_{K-1} > 0; the noise z is fed as x_0 at t_0. Step k predicts x0_hat_k = D_theta(x_k, t_k, c)
and, for k < K - 1, moves to t_{k+1} by a Gaussian transition x_{k+1} ~ N(mean_k, std_k^2 I); the output is
x0_hat_{K-1} (the last step is deterministic, so K = 1 is the one-step generator). With eps_hat = (x - a x0_hat) / s
and (a', s') the schedule at t':
- 'ddim' (DDIM-eta; SOURCED: SDPO's code): mean = a' x0_hat + sqrt(s'^2 - std^2) eps_hat, std = eta (s' / s)
  sqrt(1 - a^2 / a'^2); eta = 1 is the DDPM posterior q(x' | x, x0_hat), eta = 0 deterministic DDIM;
- 'cps' (coefficient-preserving; SOURCED: RTDMD's code): the same mean form with std = s' sin(eta pi / 2);
- 'sde' (flow only; SOURCED: Flow-GRPO): mean = x + (t' - t) [v + g^2 / (2 t) eps_hat], std = g sqrt(t - t'),
  g = eta sqrt(t / (1 - t)), where at t = 1 the denominator reads t' (as Flow-GRPO reads its second time).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import Schedule, eps_from_x0, expand_like, flow_velocity_from_x0

SAMPLERS = ("ddim", "cps", "sde")


def check_sampler(sampler: str, eta: float, schedule: Schedule) -> None:
    """ValueError naming the key for an unknown sampler kind, eta outside [0, 1] or an SDE on a VP schedule."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown kind {sampler!r}; choose one of {list(SAMPLERS)}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if sampler == "sde" and schedule.kind != "flow":
        raise ValueError(f"sampler: 'sde' (Flow-GRPO) needs a flow schedule, got {schedule.kind!r}")


def transition(
    x: Tensor, x0_hat: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule, sampler: str, eta: float
) -> tuple[Tensor, Tensor]:
    """(mean [B, ...], std [B]) of x' ~ p(x' | x) from t to t_next < t given x0_hat at (x, t) (§8.1)."""
    a, s = schedule.alpha_sigma(t)
    a_next, s_next = schedule.alpha_sigma(t_next)
    eps_hat = eps_from_x0(x, x0_hat, expand_like(a, x), expand_like(s, x))
    if sampler == "sde":
        denominator = 1 - torch.where(t < 1, t, t_next)
        g = eta * (t / denominator).sqrt()
        velocity = flow_velocity_from_x0(x, x0_hat, expand_like(t, x))
        drift = velocity + expand_like(g**2 / (2 * t), x) * eps_hat
        return x + expand_like(t_next - t, x) * drift, g * (t - t_next).sqrt()
    if sampler == "ddim":
        std = eta * s_next / s * (1 - a**2 / a_next**2).clamp(min=0).sqrt()
    else:
        std = s_next * math.sin(eta * math.pi / 2)
    direction = (s_next**2 - std**2).clamp(min=0).sqrt()
    return expand_like(a_next, x) * x0_hat + expand_like(direction, x) * eps_hat, std


def gaussian_log_density(x: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """log N(x; mean, std^2 I) per sample, summed ('sum') or averaged ('mean', SDPO's choice) over dimensions."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce: unknown value {reduce!r}; choose 'sum' or 'mean'")
    std = expand_like(std, x)
    log_density = -0.5 * ((x - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)
    flat = log_density.flatten(1)
    return flat.sum(1) if reduce == "sum" else flat.mean(1)


def default_times(steps: int) -> list[float]:
    """t_k = 1 - k / K (SD-Turbo's 999, 749, 499, 249 of 999 at K = 4, read continuously)."""
    return [1 - k / steps for k in range(steps)]


@dataclass
class Trajectory:
    """One stochastic rollout: states x_k [B, K, ...] (fed at times[k]), x0_hats [B, K, ...], and per transition
    k < K - 1 its means [B, K-1, ...], stds [B, K-1], noise [B, K-1, ...] and log-densities [B, K-1] (averaged
    over dimensions; NaN for a deterministic transition, std = 0). The image is x0_hats[:, -1]."""

    times: Tensor
    states: Tensor
    x0_hats: Tensor
    means: Tensor
    stds: Tensor
    noise: Tensor
    log_probs: Tensor

    @property
    def image(self) -> Tensor:
        return self.x0_hats[:, -1]

    @property
    def transitions(self) -> int:
        return self.log_probs.shape[1]


class Policy(Protocol):
    """What the RL loop (didr/training/rl.py) trains: a stochastic sampler with per-transition log-densities."""

    eta: float

    @property
    def steps(self) -> int: ...

    @property
    def sample_shape(self) -> tuple[int, ...]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def sample(
        self, z: Tensor, cond: Conditioning, rng: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Trajectory: ...

    def log_prob(
        self, x: Tensor, x_next: Tensor, k: Tensor | int, cond: Conditioning, reduce: str = "mean"
    ) -> Tensor: ...

    def decode(self, x0: Tensor) -> Tensor: ...


class FewStepGenerator(nn.Module):
    """K evaluations of a trainable denoiser at fixed times, joined by stochastic transitions (§8.1).

    `forward(z, cond)` is the deterministic sampler (every transition with std = 0: DDIM for VP, Euler for flow), so
    the one-step objectives (DMD2, DIDR, ...) and `didr.training.loop.align` train it unchanged; `sample` draws a
    stochastic Trajectory and `log_prob` re-evaluates a transition's log-density under the current parameters.
    """

    times: Tensor

    def __init__(
        self,
        body: Denoiser,
        steps: int,
        eta: float = 1.0,
        sampler: str = "ddim",
        times: Sequence[float] | None = None,
        guidance: float = 1.0,
    ):
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps (K) must be >= 1, got {steps}")
        check_sampler(sampler, eta, body.schedule)
        chosen = list(default_times(steps) if times is None else times)
        if len(chosen) != steps:
            raise ValueError(f"times must hold steps = {steps} values, got {len(chosen)}")
        if not all(0 < t <= 1 for t in chosen) or any(b >= a for a, b in itertools.pairwise(chosen)):
            raise ValueError(f"times must decrease strictly within (0, 1], got {chosen}")
        self.body, self.eta, self.sampler, self.guidance = body, eta, sampler, guidance
        self.register_buffer("times", torch.tensor(chosen, dtype=torch.float64), persistent=False)

    @classmethod
    def from_teacher(
        cls, teacher: Denoiser, steps: int, eta: float = 1.0, sampler: str = "ddim",
        times: Sequence[float] | None = None, guidance: float = 1.0,
    ) -> FewStepGenerator:  # fmt: skip
        """A generator on a trainable copy of `teacher`."""
        return cls(teacher.trainable_copy(), steps, eta, sampler, times, guidance)

    @property
    def steps(self) -> int:
        return self.times.numel()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.body.sample_shape

    def _time(self, k: Tensor | int, like: Tensor) -> Tensor:
        index = torch.as_tensor(k, device=like.device).expand(like.shape[0])
        return self.times.to(like.device)[index].to(like.dtype)

    def predict(self, x: Tensor, k: Tensor | int, cond: Conditioning) -> Tensor:
        """x0_hat_k = D_theta(x, t_k, c) with the generator's guidance; k an int or per-sample step indices [B]."""
        return self.body.x0(x, self._time(k, x), cond, self.guidance)

    def step(self, x: Tensor, x0_hat: Tensor, k: Tensor | int, eta: float | None = None) -> tuple[Tensor, Tensor]:
        """(mean, std) of the transition from t_k to t_{k+1} (k < K - 1); eta defaults to the generator's."""
        index = torch.as_tensor(k, device=x.device)
        return transition(
            x, x0_hat, self._time(index, x), self._time(index + 1, x), self.body.schedule, self.sampler,
            self.eta if eta is None else eta,
        )  # fmt: skip

    def forward(self, z: Tensor, cond: Conditioning) -> Tensor:
        """The deterministic K-step sample (all transitions at std = 0)."""
        x = z
        for k in range(self.steps - 1):
            x, _ = self.step(x, self.predict(x, k, cond), k, eta=0.0)
        return self.predict(x, self.steps - 1, cond)

    def sample(
        self, z: Tensor, cond: Conditioning, rng: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Trajectory:
        """A stochastic rollout from x_0 = z; `noise` [B, K-1, ...] fixes the transitions' noise, else it is drawn
        from `rng`. Differentiable when called with gradients on (callers that only score wrap it in no_grad)."""
        if noise is None:
            shape = (z.shape[0], self.steps - 1, *z.shape[1:])
            noise = torch.randn(shape, generator=rng, device=z.device, dtype=z.dtype)
        x, states, x0_hats, means, stds, log_probs = z, [], [], [], [], []
        for k in range(self.steps):
            states.append(x)
            x0_hats.append(self.predict(x, k, cond))
            if k == self.steps - 1:
                break
            mean, std = self.step(x, x0_hats[-1], k)
            x = mean + expand_like(std, mean) * noise[:, k]
            means.append(mean)
            stds.append(std)
            log_probs.append(gaussian_log_density(x, mean, std))
        empty = z.new_zeros((z.shape[0], 0))
        return Trajectory(
            times=self.times.to(z),
            states=torch.stack(states, 1),
            x0_hats=torch.stack(x0_hats, 1),
            means=torch.stack(means, 1) if means else z.new_zeros((z.shape[0], 0, *z.shape[1:])),
            stds=torch.stack(stds, 1) if stds else empty,
            noise=noise,
            log_probs=torch.stack(log_probs, 1) if log_probs else empty,
        )

    def state_after(
        self, z: Tensor, cond: Conditioning, stop: int, rng: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(x_s [B, ...], s [B]): the state after transition `stop` (s = t_{stop+1}), or the image (s = 0) when
        stop = K - 1, as AC-DMD trains on (§8.2). The steps before `stop` run without gradients (DMD2's backward
        simulation), so only the last prediction carries them; `noise` [B, K-1, ...] as in `sample`."""
        if not 0 <= stop < self.steps:
            raise ValueError(f"stop must lie in [0, {self.steps - 1}], got {stop}")
        if noise is None:
            shape = (z.shape[0], self.steps - 1, *z.shape[1:])
            noise = torch.randn(shape, generator=rng, device=z.device, dtype=z.dtype)
        x = z
        with torch.no_grad():
            for k in range(stop):
                mean, std = self.step(x, self.predict(x, k, cond), k)
                x = mean + expand_like(std, mean) * noise[:, k]
        x0_hat = self.predict(x, stop, cond)
        if stop == self.steps - 1:
            return x0_hat, torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        mean, std = self.step(x, x0_hat, stop)
        return mean + expand_like(std, mean) * noise[:, stop], self._time(stop + 1, x)

    def decode(self, x0: Tensor) -> Tensor:
        """The body's decoder (samples to images in [0, 1])."""
        return self.body.decode(x0)

    def log_prob(self, x: Tensor, x_next: Tensor, k: Tensor | int, cond: Conditioning, reduce: str = "mean") -> Tensor:
        """log p_theta(x_next | x) of transition k (per-sample indices allowed) under the current parameters."""
        mean, std = self.step(x, self.predict(x, k, cond), k)
        if not bool((std > 0).all()):
            raise ValueError(f"eta = {self.eta}: transition {k} is deterministic and has no log-density")
        return gaussian_log_density(x_next, mean, std, reduce)
