"""Tests for didr.diffusion: schedules, conversions, diffusers parity, the K-step solver and time samplers.

Tolerances are stated where they are used. float64 everywhere a comparison is tighter than about 1e-6.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from didr import diffusion as D

F64 = torch.float64
VP_CONFIGS = {"sd": D.sd_vp_config, "cosine": D.cosine_vp_config}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _schedules() -> dict[str, D.Schedule]:
    return {
        "vp_sd": D.VPSchedule.from_scheduler_config(D.sd_vp_config()),
        "vp_cosine": D.VPSchedule.from_scheduler_config(D.cosine_vp_config()),
        "flow": D.FlowSchedule(),
    }


SCHEDULES = _schedules()


def _ab(schedule: D.Schedule, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, s = schedule.alpha_sigma(t)
    return D.expand_like(a, x), D.expand_like(s, x)


# ---------------------------------------------------------------- 6. expand_like


def test_expand_like_shape_and_values():
    v = torch.tensor([1.0, 2.0, 3.0])
    x = torch.zeros(3, 4, 5, 6)
    e = D.expand_like(v, x)
    assert e.shape == (3, 1, 1, 1)
    out = e * torch.ones_like(x)
    assert out.shape == x.shape
    # every entry of sample i equals v[i]
    assert torch.equal(out[:, 2, 3, 4], v)
    assert torch.equal(out.amax(dim=(1, 2, 3)), v) and torch.equal(out.amin(dim=(1, 2, 3)), v)
    # already-matching rank is a no-op
    assert D.expand_like(v, torch.zeros(3)).shape == (3,)


# ---------------------------------------------------------------- 1. VP schedule vs diffusers' tables


@pytest.mark.parametrize("name", list(VP_CONFIGS))
def test_vp_schedule_matches_ddpm_alphas_cumprod_on_grid(name):
    config = VP_CONFIGS[name]()
    sched = D.VPSchedule.from_scheduler_config(config)
    ref = DDPMScheduler(**config).alphas_cumprod.to(F64)
    T = ref.numel()
    assert T == 1000 and sched.num_train_timesteps == T
    k = torch.arange(T, dtype=F64)
    t = k / (T - 1)
    # float64 log/exp of the same float32 table: agreement to 1e-12 relative
    torch.testing.assert_close(sched.abar(t), ref, rtol=1e-12, atol=0)
    a, s = sched.alpha_sigma(t)
    assert a.dtype == F64 and s.dtype == F64
    torch.testing.assert_close(a, ref.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(t), rtol=0, atol=1e-14)
    # the network sees the integer grid index
    torch.testing.assert_close(sched.model_timestep(t), k, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(VP_CONFIGS))
def test_vp_schedule_between_grid_points(name):
    config = VP_CONFIGS[name]()
    sched = D.VPSchedule.from_scheduler_config(config)
    ref = DDPMScheduler(**config).alphas_cumprod.to(F64)
    T = ref.numel()
    # log-linear interpolation: the midpoint is the geometric mean of neighbouring grid values
    k = torch.tensor([0, 10, 499, 900, T - 2])
    t_mid = (k.to(F64) + 0.5) / (T - 1)
    torch.testing.assert_close(sched.abar(t_mid), (ref[k] * ref[k + 1]).sqrt(), rtol=1e-12, atol=0)
    # dense grid: a strictly decreasing, s strictly increasing, a^2 + s^2 = 1; endpoints t=0 and t=1 are grid points
    t = torch.linspace(0, 1, 7777, dtype=F64)
    a, s = sched.alpha_sigma(t)
    assert bool((a[1:] < a[:-1]).all())
    assert bool((s[1:] > s[:-1]).all())
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(sched.abar(torch.tensor([0.0, 1.0], dtype=F64)), ref[[0, -1]], rtol=1e-12, atol=0)
    # float32 input gives float32 output of the same values
    a32, _ = sched.alpha_sigma(t.float())
    assert a32.dtype == torch.float32
    torch.testing.assert_close(a32.double(), a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([0.9, 0.0]),  # zero
        torch.tensor([1.0, 0.5]),  # one
        torch.tensor([0.9, 1.2]),  # above one
        torch.tensor([0.9, -0.1]),  # negative
        torch.tensor([0.5]),  # too short
        torch.full((2, 3), 0.5),  # not 1-D
    ],
)
def test_vp_schedule_rejects_invalid_alphas_cumprod(bad):
    with pytest.raises(ValueError, match="alphas_cumprod"):
        D.VPSchedule(bad)


# ---------------------------------------------------------------- 2. conversions and round trips

TIMES = [0.05, 0.3, 0.5, 0.8, 0.97]


def _data(seed: int = 0, shape=(5, 3, 4, 4)):
    g = _gen(seed)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    t = torch.tensor(TIMES, dtype=F64)
    return x0, eps, t


@pytest.mark.parametrize("key", list(SCHEDULES))
def test_eps_x0_score_round_trips(key):
    schedule = SCHEDULES[key]
    x0, eps, t = _data(1)
    x_t = schedule.diffuse(x0, eps, t)
    a, s = _ab(schedule, t, x0)
    # diffuse is a x0 + s eps, with a, s the schedule's own
    torch.testing.assert_close(x_t, a * x0 + s * eps, rtol=0, atol=1e-14)
    if key == "flow":
        torch.testing.assert_close(a, D.expand_like(1 - t, x0).expand_as(a), rtol=0, atol=0)
        torch.testing.assert_close(s, D.expand_like(t, x0).expand_as(s), rtol=0, atol=0)
    # eps <-> x0 (the largest 1/a is at t=0.97 on cosine VP: a ~ 0.05, so allow 1e-10)
    torch.testing.assert_close(D.x0_from_eps(x_t, eps, a, s), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(D.eps_from_x0(x_t, x0, a, s), eps, rtol=0, atol=1e-10)
    # score: the true conditional score of N(a x0, s^2) at x_t is -eps / s
    score = D.score_from_x0(x_t, x0, a, s)
    torch.testing.assert_close(score, -eps / s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(score, -(x_t - a * x0) / s**2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(D.x0_from_score(x_t, score, a, s), x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("key", ["vp_sd", "vp_cosine"])
def test_vp_v_prediction_round_trip(key):
    schedule = SCHEDULES[key]
    x0, eps, t = _data(2)
    x_t = schedule.diffuse(x0, eps, t)
    a, s = _ab(schedule, t, x0)
    v = D.v_from_x0(x_t, x0, a, s)
    torch.testing.assert_close(v, a * eps - s * x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(D.x0_from_v(x_t, v, a, s), x0, rtol=0, atol=1e-10)
    # and eps_hat = s x_t + a v (docs/algorithm.md §1.2)
    torch.testing.assert_close(s * x_t + a * v, eps, rtol=0, atol=1e-10)


def test_flow_conversions():
    schedule = SCHEDULES["flow"]
    x0, eps, t = _data(3)
    x_t = schedule.diffuse(x0, eps, t)
    tt = D.expand_like(t, x0)
    torch.testing.assert_close(x_t, (1 - tt) * x0 + tt * eps, rtol=0, atol=1e-15)
    v = D.flow_velocity_from_x0(x_t, x0, tt)
    torch.testing.assert_close(v, eps - x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(D.x0_from_flow_velocity(x_t, v, tt), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(D.eps_from_flow_velocity(x_t, v, tt), eps, rtol=0, atol=1e-12)
    # flow score with (a, s) = (1 - t, t): ((1 - t) x0 - x_t) / t^2 = -eps / t
    score = D.score_from_x0(x_t, x0, 1 - tt, tt)
    torch.testing.assert_close(score, ((1 - tt) * x0 - x_t) / tt**2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(score, -eps / tt, rtol=1e-10, atol=1e-10)
    # the flow velocity is the time derivative of x_t along the straight path
    h = 1e-6
    dxdt = (schedule.diffuse(x0, eps, t + h) - schedule.diffuse(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(dxdt, v, rtol=0, atol=1e-8)


def test_zimage_conventions():
    g = _gen(4)
    v = torch.randn(2, 3, 5, generator=g, dtype=F64)
    torch.testing.assert_close(D.flow_velocity_from_zimage(-v), v, rtol=0, atol=0)
    assert not torch.equal(D.flow_velocity_from_zimage(v), v)
    t = torch.tensor([0.0, 0.25, 0.9, 1.0], dtype=F64)
    torch.testing.assert_close(D.zimage_time(t), torch.tensor([1.0, 0.75, 0.1, 0.0], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("key", list(SCHEDULES))
def test_x0_shift_from_score_shift(key):
    schedule = SCHEDULES[key]
    x0, eps, t = _data(5)
    d_score = torch.randn(x0.shape, generator=_gen(6), dtype=F64)
    x_t = schedule.diffuse(x0, eps, t)
    a, s = _ab(schedule, t, x0)
    score = D.score_from_x0(x_t, x0, a, s)
    dx0 = D.x0_shift_from_score_shift(d_score, a, s)
    diff = D.x0_from_score(x_t, score + d_score, a, s) - D.x0_from_score(x_t, score, a, s)
    torch.testing.assert_close(diff, dx0, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dx0, s**2 / a * d_score, rtol=1e-12, atol=0)
    # the shifted x0 maps back to the shifted score
    torch.testing.assert_close(D.score_from_x0(x_t, x0 + dx0, a, s), score + d_score, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- 3. solver steps vs diffusers


@pytest.mark.parametrize("name", list(VP_CONFIGS))
def test_vp_step_matches_diffusers_ddim(name):
    config = VP_CONFIGS[name]()
    sched = D.VPSchedule.from_scheduler_config(config)
    ddim = DDIMScheduler(**config, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    # compare in float64 with the very same table (diffusers keeps it in float32)
    ddim.alphas_cumprod = ddim.alphas_cumprod.to(F64)
    ddim.set_timesteps(20)  # stride 50, "leading" spacing + offset 1: 951, 901, ..., 51, 1
    T = sched.num_train_timesteps
    stride = T // 20
    timesteps = ddim.timesteps.tolist()
    assert timesteps[0] == 951 and timesteps[-1] == 1 and timesteps[1] == 951 - stride
    g = _gen(7)
    x_t = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    eps_hat = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    for k in (951, 501, 101):  # none is the last step (which would use final_alpha_cumprod)
        ref = ddim.step(eps_hat, k, x_t, eta=0.0).prev_sample
        t = torch.full((2,), k / (T - 1), dtype=F64)
        t_next = torch.full((2,), (k - stride) / (T - 1), dtype=F64)
        a, s = _ab(sched, t, x_t)
        x0_hat = D.x0_from_eps(x_t, eps_hat, a, s)
        out = sched.step(x_t, x0_hat, t, t_next)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        # and the step moved something (so the comparison is not vacuous)
        assert (out - x_t).abs().max() > 1e-3


def test_vp_step_matches_diffusers_ddim_float32_table():
    """Same check with diffusers untouched (float32 coefficients): 1e-5 tolerance."""
    config = D.sd_vp_config()
    sched = D.VPSchedule.from_scheduler_config(config)
    # clip_sample defaults to True in DDIMScheduler and would clamp x0_hat to [-1, 1]
    ddim = DDIMScheduler(**config, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    ddim.set_timesteps(10)  # 901, 801, ..., 1
    g = _gen(8)
    x_t = torch.randn(1, 4, 8, 8, generator=g)
    eps_hat = torch.randn(1, 4, 8, 8, generator=g)
    ref = ddim.step(eps_hat, 401, x_t, eta=0.0).prev_sample
    t, t_next = torch.tensor([401 / 999]), torch.tensor([301 / 999])
    a, s = _ab(sched, t, x_t)
    out = sched.step(x_t, D.x0_from_eps(x_t, eps_hat, a, s), t, t_next)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flow_step_matches_diffusers_euler_and_ddim_formula():
    sched = D.FlowSchedule()
    fm = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    fm.set_timesteps(8)
    g = _gen(9)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    v_hat = torch.randn(2, 4, 8, 8, generator=g)
    for i in (0, 3, 6):
        fm._step_index = i
        sigma, sigma_next = float(fm.sigmas[i]), float(fm.sigmas[i + 1])
        assert sigma_next < sigma
        ref = fm.step(v_hat, fm.timesteps[i], x_t).prev_sample
        t = torch.full((2,), sigma, dtype=F64)
        t_next = torch.full((2,), sigma_next, dtype=F64)
        xt64, v64 = x_t.double(), v_hat.double()
        x0_hat = D.x0_from_flow_velocity(xt64, v64, D.expand_like(t, xt64))
        out = sched.step(xt64, x0_hat, t, t_next)
        # diffusers computes in float32
        torch.testing.assert_close(out, ref.double(), rtol=1e-5, atol=1e-5)
        # DDIM with a = 1 - t, s = t: a' x0_hat + s' eps_hat (exact, float64)
        eps_hat = D.eps_from_flow_velocity(xt64, v64, D.expand_like(t, xt64))
        ddim = D.expand_like(1 - t_next, xt64) * x0_hat + D.expand_like(t_next, xt64) * eps_hat
        torch.testing.assert_close(out, ddim, rtol=1e-12, atol=1e-12)
        assert (out - xt64).abs().max() > 1e-3


@pytest.mark.parametrize("key", list(SCHEDULES))
def test_step_is_exact_on_noiseless_trajectory(key):
    """With the true x0 (point-mass data) a deterministic step lands on a' x0 + s' eps: the same eps at t'."""
    schedule = SCHEDULES[key]
    x0, eps, t = _data(10)
    t_next = t * 0.6
    x_t = schedule.diffuse(x0, eps, t)
    out = schedule.step(x_t, x0, t, t_next)
    torch.testing.assert_close(out, schedule.diffuse(x0, eps, t_next), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- 4. solve()


def _gaussian_denoiser(schedule: D.Schedule, c: float):
    """Exact x0_hat for data N(0, c^2 I): E[x0 | x_t] = a c^2 / (a^2 c^2 + s^2) x_t."""

    def x0_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = _ab(schedule, t, x)
        return a * c**2 / (a**2 * c**2 + s**2) * x

    return x0_fn


def _ode_gain(schedule: D.Schedule, t: torch.Tensor, c: float) -> torch.Tensor:
    a, s = schedule.alpha_sigma(t)
    return c / (a**2 * c**2 + s**2).sqrt()


SOLVE_T = [0.2, 0.5, 0.8, 0.95]


@pytest.mark.parametrize("key", list(SCHEDULES))
@pytest.mark.parametrize("K", [1, 2, 5])
def test_solve_point_mass(key, K):
    schedule = SCHEDULES[key]
    g = _gen(11)
    c = torch.randn(4, 3, 2, generator=g, dtype=F64)
    x_t = torch.randn(4, 3, 2, generator=g, dtype=F64)
    t = torch.tensor(SOLVE_T, dtype=F64)
    calls = []

    def x0_fn(x, tk):
        calls.append(tk.clone())
        return c.clone()

    out = D.solve(x0_fn, x_t, t, K, schedule)
    torch.testing.assert_close(out, c, rtol=0, atol=0)
    assert len(calls) == K
    # the times are t_k = t (1 - k / K), k = 0..K-1
    for k, tk in enumerate(calls):
        torch.testing.assert_close(tk, t * (1 - k / K), rtol=0, atol=1e-15)


@pytest.mark.parametrize("key", list(SCHEDULES))
@pytest.mark.parametrize("c", [0.5, 2.0])
def test_solve_gaussian_tweedie_and_ode_convergence(key, c):
    """K = 1 is Tweedie; growing K converges to the probability-flow ODE map x0 = c / sqrt(a^2 c^2 + s^2) x_t.

    DDIM / Euler is a first-order solver: the error falls like 1 / K. Measured worst case over t <= 0.95 and
    c in {0.5, 2}: about 5% at K = 64, 1.6% at K = 256, 0.55% at K = 1024 (VP-sd also has a floor of about
    s_0^2 / (2 a_0^2 c^2) ~ 1.7e-3 at c = 0.5, since its t = 0 is alphas_cumprod[0] = 0.99915, not 1).
    """
    schedule = SCHEDULES[key]
    t = torch.tensor(SOLVE_T, dtype=F64)
    x_t = torch.randn(4, 16, generator=_gen(12), dtype=F64)
    x0_fn = _gaussian_denoiser(schedule, c)
    a, s = _ab(schedule, t, x_t)
    # K = 1 is Tweedie
    tweedie = a * c**2 / (a**2 * c**2 + s**2) * x_t
    torch.testing.assert_close(D.solve(x0_fn, x_t, t, 1, schedule), tweedie, rtol=1e-14, atol=0)
    ode = D.expand_like(_ode_gain(schedule, t, c), x_t) * x_t
    Ks = (4, 16, 64, 256, 1024)
    errs = {}
    for K in Ks:
        out = D.solve(x0_fn, x_t, t, K, schedule)
        errs[K] = (out - ode).norm(dim=1) / ode.norm(dim=1)  # per sample (per t)
    # monotone in K, for every t
    for K0, K1 in itertools.pairwise(Ks):
        assert bool((errs[K1] < errs[K0]).all()), (K0, K1, errs[K0], errs[K1])
    # first order: quadrupling K cuts the error by about 4 (> 2.5 leaves room for the VP-sd floor)
    assert bool((errs[16] / errs[64] > 2.5).all()), errs[16] / errs[64]
    assert errs[64].max() < 5.5e-2, errs[64]
    assert errs[1024].max() < 1e-2, errs[1024]
    # at low noise K = 64 is already within 1e-2 when the data is broad (c = 2)
    if c == 2.0:
        assert errs[64][t <= 0.5].max() < 1e-2, errs[64]
    # Tweedie itself is far from the ODE map at high noise (so the convergence check is not vacuous)
    assert ((tweedie - ode).norm(dim=1) / ode.norm(dim=1)).max().item() > 0.5


@pytest.mark.parametrize("key", list(SCHEDULES))
def test_solve_first_x0(key):
    schedule = SCHEDULES[key]
    c = 1.5
    t = torch.tensor(SOLVE_T, dtype=F64)
    x_t = torch.randn(4, 8, generator=_gen(13), dtype=F64)
    x0_fn = _gaussian_denoiser(schedule, c)
    calls = []

    def counting(x, tk):
        calls.append(1)
        return x0_fn(x, tk)

    K = 3
    ref = D.solve(x0_fn, x_t, t, K, schedule)
    right = x0_fn(x_t, t)
    out = D.solve(counting, x_t, t, K, schedule, first_x0=right)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)
    assert len(calls) == K - 1  # the first denoiser call is skipped
    wrong = right + 0.3
    out_wrong = D.solve(x0_fn, x_t, t, K, schedule, first_x0=wrong)
    assert (out_wrong - ref).abs().max() > 1e-3
    # K = 1 returns first_x0 as is
    torch.testing.assert_close(D.solve(x0_fn, x_t, t, 1, schedule, first_x0=wrong), wrong, rtol=0, atol=0)


@pytest.mark.parametrize("key", list(SCHEDULES))
def test_solve_checkpoint_same_value_and_grad(key):
    schedule = SCHEDULES[key]
    torch.manual_seed(0)
    W = torch.randn(8, 8, dtype=F64) / 3
    W.requires_grad_(True)

    def x0_fn(x, tk):  # nonlinear and time-dependent, so activations matter
        a, s = _ab(schedule, tk, x)
        return torch.tanh(x @ W) * a + s * x.sin()

    t = torch.tensor(SOLVE_T, dtype=F64)
    base = torch.randn(4, 8, generator=_gen(14), dtype=F64)
    results = []
    for ckpt in (False, True):
        x_t = base.clone().requires_grad_(True)
        out = D.solve(x0_fn, x_t, t, 4, schedule, checkpoint=ckpt)
        gx, gw = torch.autograd.grad((out**2).sum(), (x_t, W))
        results.append((out.detach(), gx, gw))
    (o0, gx0, gw0), (o1, gx1, gw1) = results
    torch.testing.assert_close(o1, o0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=1e-6)
    assert gx0.abs().max() > 1e-3
    # without grad enabled, checkpoint is a no-op and still gives the same value
    with torch.no_grad():
        torch.testing.assert_close(D.solve(x0_fn, base, t, 4, schedule, checkpoint=True), o0, rtol=1e-12, atol=0)


@pytest.mark.parametrize("key", list(SCHEDULES))
def test_solve_gradient_matches_ode_slope(key):
    schedule = SCHEDULES[key]
    c = 0.7
    t = torch.tensor(SOLVE_T, dtype=F64)
    slope = D.expand_like(_ode_gain(schedule, t, c), torch.zeros(4, 6))
    for K, rtol in ((64, 4e-2), (1024, 4e-3)):  # first-order solver: see the convergence test above
        x_t = torch.randn(4, 6, generator=_gen(15), dtype=F64).requires_grad_(True)
        out = D.solve(_gaussian_denoiser(schedule, c), x_t, t, K, schedule)
        (grad,) = torch.autograd.grad(out.sum(), x_t)
        # the K-step map is linear in x_t here, so autograd must return exactly out / x_t
        torch.testing.assert_close(grad, (out / x_t).detach(), rtol=1e-10, atol=0)
        torch.testing.assert_close(grad, slope.expand_as(grad), rtol=rtol, atol=0)


@pytest.mark.parametrize("steps", [0, -1])
def test_solve_rejects_bad_steps(steps):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="steps"):
        D.solve(lambda x, t: x, x, torch.tensor([0.5]), steps, SCHEDULES["flow"])


# ---------------------------------------------------------------- 5. time samplers


def test_uniform_time():
    sampler = D.UniformTime(0.1, 0.7)
    t = sampler(20_000, _gen(16))
    assert t.shape == (20_000,)
    assert t.min() >= 0.1 and t.max() <= 0.7
    # mean 0.4, sd of the mean 0.6 / sqrt(12 * 20000) ~ 1.2e-3: tolerance 6e-3
    assert abs(t.mean().item() - 0.4) < 6e-3
    # variance (0.6)^2 / 12 = 0.03
    assert abs(t.var().item() - 0.03) < 1.5e-3
    # spans the range
    assert t.min() < 0.11 and t.max() > 0.69
    torch.testing.assert_close(sampler(100, _gen(3)), sampler(100, _gen(3)), rtol=0, atol=0)
    assert not torch.equal(sampler(100, _gen(3)), sampler(100, _gen(4)))


def test_logit_normal_time():
    mean, std = 0.5, 1.0
    sampler = D.LogitNormalTime(mean=mean, std=std, t_min=0.05, t_max=0.95)
    t = sampler(20_000, _gen(17))
    assert t.min() >= 0.05 and t.max() <= 0.95
    # the clamp is active (sigmoid(0.5 + n) > 0.95 has probability ~ 0.02)
    assert (t == 0.95).sum() > 100
    # median sigmoid(mean) ~ 0.6225; its sampling sd ~ 1e-3
    assert abs(t.median().item() - 1 / (1 + math.exp(-mean))) < 6e-3
    # logit of the unclamped draws has mean `mean` and sd `std`
    inner = t[(t > 0.05) & (t < 0.95)]
    z = torch.logit(inner.double())
    assert abs(z.mean().item() - mean) < 0.1  # truncation shifts it slightly
    torch.testing.assert_close(sampler(100, _gen(5)), sampler(100, _gen(5)), rtol=0, atol=0)


def test_time_sampler_factory():
    u = D.time_sampler("uniform", t_min=0.2, t_max=0.4)
    assert isinstance(u, D.UniformTime) and (u.t_min, u.t_max) == (0.2, 0.4)
    ln = D.time_sampler("logit_normal", mean=-0.3, std=0.8)
    assert isinstance(ln, D.LogitNormalTime) and (ln.mean, ln.std) == (-0.3, 0.8)
    assert (ln.t_min, ln.t_max) == (0.02, 0.98)
    torch.testing.assert_close(ln(50, _gen(1)), D.LogitNormalTime(-0.3, 0.8)(50, _gen(1)), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: D.UniformTime(0.5, 0.5), "t_min"),
        (lambda: D.UniformTime(0.6, 0.4), "t_min"),
        (lambda: D.UniformTime(-0.1, 0.5), "t_min"),
        (lambda: D.UniformTime(0.1, 1.5), "t_max"),
        (lambda: D.LogitNormalTime(std=0.0), "std"),
        (lambda: D.LogitNormalTime(std=-1.0), "std"),
        (lambda: D.LogitNormalTime(t_min=0.9, t_max=0.1), "t_min"),
        (lambda: D.LogitNormalTime(t_min=0.0, t_max=1.2), "t_max"),
        (lambda: D.time_sampler("gamma"), "gamma"),
        (lambda: D.time_sampler("uniform", t_min=0.9, t_max=0.2), "t_min"),
    ],
)
def test_time_samplers_reject_bad_args(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_zero_terminal_snr_config_is_honoured():
    """rescale_betas_zero_snr (SD2.1-v style) must reach the schedule: abar_T is 2^-24, not the plain table's."""
    config = {**D.sd_vp_config(), "rescale_betas_zero_snr": True}
    schedule = D.VPSchedule.from_scheduler_config(config)
    expected = DDPMScheduler(**config).alphas_cumprod.double()
    abar = schedule.abar(torch.linspace(0, 1, 1000, dtype=torch.float64))
    assert abar[-1].item() == pytest.approx(2**-24, rel=1e-6)
    torch.testing.assert_close(abar[:-1], expected[:-1], rtol=1e-6, atol=0)
    plain = D.VPSchedule.from_scheduler_config(D.sd_vp_config()).abar(torch.ones(1, dtype=torch.float64))
    assert plain.item() > 1e-3
