"""AC-DMD against Gaussian closed forms (issue 16, proofs of AC-DMD; docs/algorithm.md §8.2)."""

import math

import pytest
import torch

from didr.backbones.gaussian import GaussianDenoiser
from didr.diffusion import FlowSchedule, UniformTime, VPSchedule, cosine_vp_config
from didr.objectives import DMD2
from didr.objectives.acdmd import ACDMD, fake_velocity_target, renoise, renoise_coefficients

FLOW = FlowSchedule()
MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.52]], dtype=torch.float64)
TIMES = UniformTime(0.02, 0.98)


def teacher():
    return GaussianDenoiser(MU, SIGMA, FLOW).frozen()


def fake():
    cov = torch.tensor([[0.5, -0.1], [-0.1, 0.8]], dtype=torch.float64)
    return GaussianDenoiser(torch.tensor([0.1, 0.4], dtype=torch.float64), cov, FLOW).frozen()


def forward_marginal(x0, s, eps):
    return (1 - s) * x0 + s * eps


@pytest.mark.parametrize(("s", "t"), [(0.0, 0.5), (0.25, 0.5), (0.5, 0.75), (0.75, 0.98)])
def test_renoised_marginal_is_the_forward_marginal_at_t(s, t):
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x0 = MU + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    x_s = forward_marginal(x0, s, torch.randn(n, 2, generator=g, dtype=torch.float64))
    full = lambda v: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
    x_t = renoise(x_s, full(s), full(t), torch.randn(n, 2, generator=g, dtype=torch.float64))
    mean, cov = (1 - t) * MU, (1 - t) ** 2 * SIGMA + t**2 * torch.eye(2, dtype=torch.float64)
    variance = cov.diagonal()
    assert ((x_t.mean(0) - mean).abs() < 3 * (variance / n).sqrt()).all()
    sample_cov = torch.cov(x_t.T)
    standard_error = ((variance[:, None] * variance[None, :] + cov**2) / n).sqrt()
    assert ((sample_cov - cov).abs() < 3 * standard_error).all()


def test_renoise_coefficients_close_the_gap():
    s, t = torch.tensor([0.0, 0.3, 0.6]), torch.tensor([0.4, 0.5, 0.9])
    scale, sigma = renoise_coefficients(s, t)
    torch.testing.assert_close(scale * (1 - s), 1 - t)  # the data coefficient becomes 1 - t
    torch.testing.assert_close((scale * s) ** 2 + sigma**2, t**2)  # the noise variance becomes t^2


def affine_map(fn, width):
    """(offset, matrix) of an affine fn: R^width -> R^d, read off at 0 and at the basis vectors."""
    basis = torch.cat([torch.zeros(1, width, dtype=torch.float64), torch.eye(width, dtype=torch.float64)])
    out = fn(basis)
    return out[0], (out[1:] - out[0]).T


@pytest.mark.parametrize(("s", "t"), [(0.0, 0.4), (0.2, 0.5), (0.5, 0.9), (0.7, 0.8)])
def test_the_fake_target_is_unbiased_for_the_exact_velocity(s, t):
    """x0 = mu + L z, x_s = (1 - s) x0 + s eps, x_t = A x_s + sigma n: with u = (z, eps, n) ~ N(0, I), x_t and v*
    are affine in u, so E[v* | x_t] follows from Gaussian conditioning; it must be the exact flow velocity of the
    data at t, (x_t - E[x0 | x_t]) / t."""
    factor = torch.linalg.cholesky(SIGMA)

    def parts(u):
        x0 = MU + u[:, :2] @ factor.T
        x_s = forward_marginal(x0, s, u[:, 2:4])
        ss, tt = torch.full((len(u),), s, dtype=u.dtype), torch.full((len(u),), t, dtype=u.dtype)
        return renoise(x_s, ss, tt, u[:, 4:]), fake_velocity_target(x_s, ss, tt, u[:, 4:])

    x_offset, x_matrix = affine_map(lambda u: parts(u)[0], 6)
    v_offset, v_matrix = affine_map(lambda u: parts(u)[1], 6)
    gain = v_matrix @ x_matrix.T @ torch.linalg.inv(x_matrix @ x_matrix.T)
    x_t = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    conditional = v_offset + (x_t - x_offset) @ gain.T
    times = torch.full((32,), t, dtype=torch.float64)
    exact = (x_t - teacher().predict_x0(x_t, times, {})) / t
    torch.testing.assert_close(conditional, exact, rtol=1e-9, atol=1e-10)


def grad_of(objective, x, cond, seed=11, s=None):
    x = x.clone().requires_grad_(True)
    rng = torch.Generator().manual_seed(seed)
    loss, _ = objective(x, cond, rng) if s is None else objective.generator_loss(x, s, cond, rng)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad


def test_at_s_zero_the_generator_direction_is_dmd2s():
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.5
    cond = teacher().encode_prompts([""] * 64)
    ref, fk = teacher(), fake()
    acdmd = grad_of(ACDMD(ref, fk, TIMES, eta=0.9), x0, cond)
    dmd2 = grad_of(DMD2(ref, fk, TIMES), x0, cond)
    torch.testing.assert_close(acdmd, dmd2)
    assert acdmd.abs().mean() > 0.1


@pytest.mark.parametrize("eta", [0.0, 0.9])
def test_at_s_above_zero_the_direction_is_the_cps_image_of_the_x0_difference(eta):
    """Shared transition noise: x_s^fake - x_s^real = [(1 - s) - s cos(eta pi / 2) (1 - t) / t] (x0_fake - x0_real)."""
    n = 64
    x_s = torch.randn(n, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s = torch.full((n,), 0.4, dtype=torch.float64)
    cond = teacher().encode_prompts([""] * n)
    ref, fk = teacher(), fake()
    grad = grad_of(ACDMD(ref, fk, TIMES, eta=eta), x_s, cond, seed=5, s=s)
    rng = torch.Generator().manual_seed(5)
    t = s + (1 - s) * TIMES(n, rng).double()
    noise = torch.randn(n, 2, generator=rng, dtype=torch.float64)
    shared = torch.randn(n, 2, generator=rng, dtype=torch.float64)
    x_t = renoise(x_s, s, t, noise)
    x0_real, x0_fake = ref.predict_x0(x_t, t, {}), fk.predict_x0(x_t, t, {})
    factor = ((1 - s) - s * math.cos(eta * math.pi / 2) * (1 - t) / t)[:, None]
    eps_real = (x_t - (1 - t)[:, None] * x0_real) / t[:, None]
    c, sn = math.cos(eta * math.pi / 2), math.sin(eta * math.pi / 2)
    xs_real = (1 - s)[:, None] * x0_real + s[:, None] * (c * eps_real + sn * shared)
    expected = factor * (x0_fake - x0_real) / (x_s - xs_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, expected)


def test_fake_loss_is_smallest_at_the_exact_fake_score():
    """States from the teacher's own forward marginal at s: the fake loss (no consistency term) averaged over many
    draws is lower for the exact denoiser of the data than for a shifted or rescaled one."""
    n, s = 20_000, torch.full((20_000,), 0.3, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    x0 = MU + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    x_s = forward_marginal(x0, 0.3, torch.randn(n, 2, generator=g, dtype=torch.float64))
    cond = teacher().encode_prompts([""] * n)

    def loss(mean, cov):
        candidate = GaussianDenoiser(mean, cov, FLOW).frozen()
        objective = ACDMD(teacher(), candidate, TIMES, consistency_weight=0.0)
        return objective.fake_loss(x_s, s, cond, torch.Generator().manual_seed(7))[0].mean().item()

    exact = loss(MU, SIGMA)
    assert exact < loss(MU + 0.2, SIGMA) and exact < loss(MU, 1.5 * SIGMA) and exact < loss(MU, 0.6 * SIGMA)


def test_consistency_term_adds_its_weight():
    x_s = torch.randn(16, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    s = torch.full((16,), 0.2, dtype=torch.float64)
    cond = teacher().encode_prompts([""] * 16)
    plain, logs = ACDMD(teacher(), fake(), TIMES, consistency_weight=0.5).fake_loss(
        x_s, s, cond, torch.Generator().manual_seed(9)
    )
    assert plain.mean().item() == pytest.approx(logs["loss_fake"] + 0.5 * logs["loss_consistency"])
    assert logs["loss_consistency"] > 0


def test_bad_settings_name_their_key():
    vp_teacher = GaussianDenoiser(MU, SIGMA, VPSchedule.from_scheduler_config(cosine_vp_config())).frozen()
    with pytest.raises(ValueError, match=r"^acdmd needs a flow teacher"):
        ACDMD(vp_teacher, fake())
    with pytest.raises(ValueError, match=r"^eta"):
        ACDMD(teacher(), fake(), eta=1.2)
    with pytest.raises(ValueError, match=r"^consistency_weight"):
        ACDMD(teacher(), fake(), consistency_weight=-1.0)
