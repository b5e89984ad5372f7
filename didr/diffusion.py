"""Noise schedules, parameterisation conversions, time samplers and short deterministic solvers.

Everything here is a pure function of tensors (docs/algorithm.md §1). Time is continuous, t in [0, 1], for
every schedule; x_t = a_t x0 + s_t eps. A schedule also says which number its network is fed as "timestep".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

X0Fn = Callable[[Tensor, Tensor], Tensor]
"""A denoiser seen as a function (x_t, t) -> x0_hat."""


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector [B] so that it broadcasts against x [B, ...]."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


class Schedule(ABC):
    """A forward process x_t = a(t) x0 + s(t) eps on continuous time t in [0, 1]."""

    kind: str

    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a_t, s_t) for a vector of times."""

    @abstractmethod
    def model_timestep(self, t: Tensor) -> Tensor:
        """The timestep value the backbone network is conditioned on."""

    @abstractmethod
    def step(self, x_t: Tensor, x0_hat: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """One deterministic solver step from t to t_next < t given the denoiser's x0_hat at (x_t, t)."""

    def diffuse(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = a_t x0 + s_t eps."""
        a, s = self.alpha_sigma(t)
        return expand_like(a, x0) * x0 + expand_like(s, x0) * eps


class VPSchedule(Schedule):
    """Variance-preserving schedule of a discrete diffusers scheduler, read continuously.

    abar(t) interpolates log(alphas_cumprod) linearly at the fractional index t (T - 1), so at t = k / (T - 1) it
    equals the scheduler's own alphas_cumprod[k]; a = sqrt(abar), s = sqrt(1 - abar).
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if abar.dim() != 1 or abar.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")
        if not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly inside (0, 1)")
        self.log_abar = abar.log()
        self.num_train_timesteps = abar.numel()

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> VPSchedule:
        """Build from a diffusers scheduler config (DDPM, DDIM, Euler, ...), reusing diffusers' own beta tables.

        A zero-terminal-SNR config (rescale_betas_zero_snr) keeps its last abar at 2^-24, as diffusers' samplers do.
        """
        from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

        keys = (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "rescale_betas_zero_snr",
        )
        scheduler = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
        abar = scheduler.alphas_cumprod.clone()
        if config.get("rescale_betas_zero_snr"):
            abar[-1] = 2**-24  # as diffusers' Euler / DPM samplers do for a zero terminal SNR
        return cls(abar)

    def abar(self, t: Tensor) -> Tensor:
        """alphas_cumprod read at continuous time t (log-linear interpolation between grid points)."""
        log_abar = self.log_abar.to(t.device)
        u = t.double().clamp(0, 1) * (self.num_train_timesteps - 1)
        lo = u.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = u - lo
        return (log_abar[lo] * (1 - frac) + log_abar[lo + 1] * frac).exp()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.abar(t)
        return abar.sqrt().to(t.dtype), (1 - abar).sqrt().to(t.dtype)

    def model_timestep(self, t: Tensor) -> Tensor:
        return t * (self.num_train_timesteps - 1)

    def step(self, x_t: Tensor, x0_hat: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """DDIM (eta = 0): x_next = a' x0_hat + s' eps_hat."""
        a, s = self.alpha_sigma(t)
        a_next, s_next = self.alpha_sigma(t_next)
        eps_hat = eps_from_x0(x_t, x0_hat, expand_like(a, x_t), expand_like(s, x_t))
        return expand_like(a_next, x_t) * x0_hat + expand_like(s_next, x_t) * eps_hat


class FlowSchedule(Schedule):
    """Rectified flow: x_t = (1 - t) x0 + t eps, velocity v = eps - x0; the network sees t * num_train_timesteps."""

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, t

    def model_timestep(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps

    def step(self, x_t: Tensor, x0_hat: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """Euler on the flow ODE: x_next = x_t + (t_next - t) v_hat."""
        v_hat = flow_velocity_from_x0(x_t, x0_hat, expand_like(t, x_t))
        return x_t + expand_like(t_next - t, x_t) * v_hat


# ---------------------------------------------------------------- conversions (a, s broadcast against x)


def x0_from_eps(x_t: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """x0 = (x_t - s eps) / a."""
    return (x_t - s * eps) / a


def eps_from_x0(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """eps = (x_t - a x0) / s."""
    return (x_t - a * x0) / s


def x0_from_v(x_t: Tensor, v: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """VP v-prediction, v = a eps - s x0: x0 = a x_t - s v (needs a^2 + s^2 = 1)."""
    return a * x_t - s * v


def v_from_x0(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """VP v-prediction: v = a eps - s x0 with eps = (x_t - a x0) / s."""
    return a * eps_from_x0(x_t, x0, a, s) - s * x0


def score_from_x0(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """Tweedie: S(x_t) = (a x0_hat - x_t) / s^2."""
    return (a * x0 - x_t) / s**2


def x0_from_score(x_t: Tensor, score: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """Inverse Tweedie: x0_hat = (x_t + s^2 S) / a."""
    return (x_t + s**2 * score) / a


def x0_shift_from_score_shift(d_score: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """A score correction dS in x0 units: dx0 = (s^2 / a) dS (docs/algorithm.md §1.3)."""
    return s**2 / a * d_score


def x0_from_flow_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Rectified flow, v = eps - x0: x0 = x_t - t v."""
    return x_t - t * v


def flow_velocity_from_x0(x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """Rectified flow: v = (x_t - x0) / t."""
    return (x_t - x0) / t


def eps_from_flow_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Rectified flow: eps = x_t + (1 - t) v."""
    return x_t + (1 - t) * v


def zimage_time(t: Tensor) -> Tensor:
    """Z-Image feeds its transformer tau = 1 - t (tau = 1 is clean)."""
    return 1 - t


def flow_velocity_from_zimage(u: Tensor) -> Tensor:
    """Z-Image's transformer returns u = -v."""
    return -u


# ---------------------------------------------------------------- per-sample draws


class SlicedGenerator(torch.Generator):
    """A seeded generator shared by the `parts` pieces of one global batch (processes x micro-batches).

    The per-sample draws below take the whole global batch's numbers from it and keep piece `part`, so each piece sees
    exactly what one process drawing the global batch would see, and every process's stream stays in step with the
    others' (docs/pipeline.md, "many GPUs"). With parts = 1 they are plain torch draws.
    """

    def __new__(cls, device: torch.device | str = "cpu", parts: int = 1) -> SlicedGenerator:
        return super().__new__(cls, device)  # type: ignore[call-arg]  # torch.Generator(device), untyped

    def __init__(self, device: torch.device | str = "cpu", parts: int = 1):
        if parts < 1:
            raise ValueError(f"parts must be >= 1, got {parts}")
        self.parts, self.part = parts, 0


def _piece(draw: Callable[[tuple[int, ...]], Tensor], shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    parts, part = getattr(generator, "parts", 1), getattr(generator, "part", 0)
    if parts == 1:
        return draw(shape)
    n = shape[0]
    return draw((n * parts, *shape[1:]))[part * n : (part + 1) * n]


def batch_randn(shape: tuple[int, ...], generator: torch.Generator, **kwargs: Any) -> Tensor:
    """N(0, I) draws for the `shape[0]` samples of this piece of the batch (torch.randn's keyword arguments)."""
    return _piece(lambda s: torch.randn(s, generator=generator, **kwargs), shape, generator)


def batch_rand(n: int, generator: torch.Generator, **kwargs: Any) -> Tensor:
    """U[0, 1) draws for the `n` samples of this piece of the batch."""
    return _piece(lambda s: torch.rand(s, generator=generator, **kwargs), (n,), generator)


def batch_randint(high: int, n: int, generator: torch.Generator, **kwargs: Any) -> Tensor:
    """Integers in [0, high) for the `n` samples of this piece of the batch."""
    return _piece(lambda s: torch.randint(high, s, generator=generator, **kwargs), (n,), generator)


# ---------------------------------------------------------------- time samplers


class UniformTime:
    """t ~ U[t_min, t_max]."""

    def __init__(self, t_min: float = 0.02, t_max: float = 0.98):
        if not 0 <= t_min < t_max <= 1:
            raise ValueError(f"time range must satisfy 0 <= t_min < t_max <= 1, got ({t_min}, {t_max})")
        self.t_min, self.t_max = t_min, t_max

    def __call__(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        u = batch_rand(n, generator, device=device)
        return self.t_min + (self.t_max - self.t_min) * u


class LogitNormalTime:
    """t = sigmoid(m + s n), n ~ N(0, 1), clamped to [t_min, t_max] (the SD3 training density)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, t_min: float = 0.02, t_max: float = 0.98):
        if std <= 0:
            raise ValueError(f"logit-normal std must be > 0, got {std}")
        if not 0 <= t_min < t_max <= 1:
            raise ValueError(f"time range must satisfy 0 <= t_min < t_max <= 1, got ({t_min}, {t_max})")
        self.mean, self.std, self.t_min, self.t_max = mean, std, t_min, t_max

    def __call__(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
        z = batch_randn((n,), generator, device=device)
        return torch.sigmoid(self.mean + self.std * z).clamp(self.t_min, self.t_max)


def time_sampler(name: str, **kwargs: float) -> UniformTime | LogitNormalTime:
    """Time sampler by name: 'uniform' or 'logit_normal'."""
    samplers = {"uniform": UniformTime, "logit_normal": LogitNormalTime}
    if name not in samplers:
        raise ValueError(f"time_sampling: unknown sampler {name!r}; choose one of {sorted(samplers)}")
    return samplers[name](**kwargs)


# ---------------------------------------------------------------- deterministic solvers


def solve(
    x0_fn: X0Fn,
    x_t: Tensor,
    t: Tensor,
    steps: int,
    schedule: Schedule,
    first_x0: Tensor | None = None,
    checkpoint: bool = False,
) -> Tensor:
    """Differentiable K-step deterministic solve from (x_t, t) to a clean x0 (docs/algorithm.md §1.5, D_K).

    The times are t_k = t (1 - k / K); each step is the schedule's own (DDIM for VP, Euler for flow) and the last
    returns the denoiser's x0_hat at t_{K-1}. `first_x0` reuses an x0_hat already computed at (x_t, t);
    `checkpoint` recomputes each denoiser call in the backward pass instead of storing its activations.
    """
    if steps < 1:
        raise ValueError(f"steps (K) must be >= 1, got {steps}")

    def denoise(x: Tensor, t_k: Tensor) -> Tensor:
        if checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(x0_fn, x, t_k, use_reentrant=False)
        return x0_fn(x, t_k)

    x = x_t
    x0_hat = first_x0 if first_x0 is not None else denoise(x, t)
    for k in range(1, steps):
        t_prev, t_k = t * (1 - (k - 1) / steps), t * (1 - k / steps)
        x = schedule.step(x, x0_hat, t_prev, t_k)
        x0_hat = denoise(x, t_k)
    return x0_hat


def cosine_vp_config(num_train_timesteps: int = 1000) -> dict[str, Any]:
    """A diffusers scheduler config for the cosine (squaredcos_cap_v2) VP schedule."""
    return {"num_train_timesteps": num_train_timesteps, "beta_schedule": "squaredcos_cap_v2"}


def sd_vp_config() -> dict[str, Any]:
    """The scheduler config of Stable Diffusion 1.5 / SDXL (scaled_linear betas 0.00085 -> 0.012)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    }
