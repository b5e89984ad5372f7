"""The K-step generator: its transitions against DDPM / DDIM / CPS / Flow-GRPO closed forms, its log-densities and
its argument checks (issue 16, deliverable 1; docs/algorithm.md §8.1)."""

import math

import pytest
import torch

from didr.backbones.gaussian import GaussianDenoiser
from didr.diffusion import FlowSchedule, VPSchedule, sd_vp_config, solve
from didr.fewstep import FewStepGenerator, gaussian_log_density, transition
from didr.generator import OneStepGenerator
from didr.objectives import DMD2, FakeScoreLoss
from didr.training.loop import align

VP = VPSchedule.from_scheduler_config(sd_vp_config())
FLOW = FlowSchedule()
MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.52]], dtype=torch.float64)


def points(n=256, d=3, seed=0):
    """Random (x, x0_hat, t, t_next) with t_next < t."""
    g = torch.Generator().manual_seed(seed)
    x, x0_hat = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    return x, x0_hat, t, t * torch.rand(n, generator=g, dtype=torch.float64)


def gaussian_generator(schedule, steps=4, **settings):
    return FewStepGenerator(GaussianDenoiser(MU, SIGMA, schedule).trainable_copy(), steps, **settings)


def test_ddim_with_eta_one_is_the_ddpm_posterior():
    x, x0_hat, t, t_next = points()
    mean, std = transition(x, x0_hat, t, t_next, VP, "ddim", 1.0)
    abar, abar_next = VP.abar(t)[:, None], VP.abar(t_next)[:, None]
    alpha = abar / abar_next  # the one-jump alpha_t of q(x' | x_t, x0)
    posterior_mean = (abar_next.sqrt() * (1 - alpha) * x0_hat + alpha.sqrt() * (1 - abar_next) * x) / (1 - abar)
    posterior_var = (1 - abar_next) / (1 - abar) * (1 - alpha)
    torch.testing.assert_close(mean, posterior_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(std, posterior_var[:, 0].sqrt(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", [VP, FLOW], ids=["vp", "flow"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9, 1.0])
def test_cps_is_ddim_with_std_s_next_sin(schedule, eta):
    x, x0_hat, t, t_next = points(seed=1)
    mean, std = transition(x, x0_hat, t, t_next, schedule, "cps", eta)
    a, s = (v[:, None] for v in schedule.alpha_sigma(t))
    a_next, s_next = (v[:, None] for v in schedule.alpha_sigma(t_next))
    eps_hat = (x - a * x0_hat) / s
    torch.testing.assert_close(std, s_next[:, 0] * math.sin(eta * math.pi / 2))  # RTDMD's rho
    torch.testing.assert_close(mean, a_next * x0_hat + s_next * math.cos(eta * math.pi / 2) * eps_hat)


@pytest.mark.parametrize(("schedule", "sampler"), [(VP, "ddim"), (VP, "cps"), (FLOW, "ddim"), (FLOW, "cps")])
def test_eta_zero_is_the_schedules_deterministic_step(schedule, sampler):
    x, x0_hat, t, t_next = points(seed=2)
    mean, std = transition(x, x0_hat, t, t_next, schedule, sampler, 0.0)
    torch.testing.assert_close(mean, schedule.step(x, x0_hat, t, t_next))  # DDIM (VP), Euler (flow)
    assert bool((std == 0).all())


def test_flow_grpo_sde_transition():
    x, x0_hat, t, t_next = points(seed=3)
    eta = 0.7
    mean, std = transition(x, x0_hat, t, t_next, FLOW, "sde", eta)
    v, dt = (x - x0_hat) / t[:, None], (t_next - t)[:, None]
    g = eta * (t / (1 - t)).sqrt()[:, None]
    # Flow-GRPO's written form: x (1 + g^2 dt / (2 t)) + v (1 + g^2 (1 - t) / (2 t)) dt
    flow_grpo = x * (1 + g**2 / (2 * t[:, None]) * dt) + v * (1 + g**2 * (1 - t[:, None]) / (2 * t[:, None])) * dt
    torch.testing.assert_close(mean, flow_grpo)
    torch.testing.assert_close(std, g[:, 0] * (-dt[:, 0]).sqrt())
    at_one, std_one = transition(x[:1], x0_hat[:1], torch.ones(1, dtype=x.dtype), t_next[:1], FLOW, "sde", eta)
    assert torch.isfinite(at_one).all() and std_one.item() == pytest.approx(eta)  # g sqrt(1 - t') with g read at t'


@pytest.mark.parametrize(("schedule", "sampler", "eta"), [(VP, "ddim", 1.0), (FLOW, "cps", 0.9), (FLOW, "sde", 0.7)])
def test_trajectory_log_densities_are_normal_ones(schedule, sampler, eta):
    gen = gaussian_generator(schedule, steps=4, sampler=sampler, eta=eta)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cond = gen.body.encode_prompts([""] * 64)
    with torch.no_grad():
        path = gen.sample(z, cond, torch.Generator().manual_seed(5))
    assert path.states.shape == (64, 4, 2) and path.x0_hats.shape == (64, 4, 2) and path.log_probs.shape == (64, 3)
    torch.testing.assert_close(path.image, path.x0_hats[:, -1])
    for k in range(3):
        x_next = path.states[:, k + 1]
        torch.testing.assert_close(x_next, path.means[:, k] + path.stds[:, k, None] * path.noise[:, k])
        normal = torch.distributions.Normal(path.means[:, k], path.stds[:, k, None]).log_prob(x_next).sum(1)
        torch.testing.assert_close(gaussian_log_density(x_next, path.means[:, k], path.stds[:, k], "sum"), normal)
        torch.testing.assert_close(path.log_probs[:, k], normal / 2)  # averaged over the 2 dimensions
        with torch.no_grad():
            torch.testing.assert_close(gen.log_prob(path.states[:, k], x_next, k, cond), path.log_probs[:, k])
    per_sample = torch.randint(3, (64,), generator=torch.Generator().manual_seed(6))
    rows = torch.arange(64)
    with torch.no_grad():
        mixed = gen.log_prob(path.states[rows, per_sample], path.states[rows, per_sample + 1], per_sample, cond)
    torch.testing.assert_close(mixed, path.log_probs[rows, per_sample])


def test_given_noise_replays_a_trajectory_and_the_image_is_differentiable():
    gen = gaussian_generator(FLOW, steps=3, sampler="cps", eta=0.9)
    z = torch.randn(8, 2, dtype=torch.float64)
    cond = gen.body.encode_prompts([""] * 8)
    first = gen.sample(z, cond, torch.Generator().manual_seed(0))
    again = gen.sample(z, cond, noise=first.noise)
    torch.testing.assert_close(again.states, first.states)
    (grad,) = torch.autograd.grad(again.image.sum(), gen.body.mean)
    assert grad.abs().sum() > 0


def test_state_after_a_stop_is_the_trajectorys_with_gradients_from_its_last_prediction_only():
    gen = gaussian_generator(FLOW, steps=4, sampler="cps", eta=0.9)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cond = gen.body.encode_prompts([""] * 8)
    with torch.no_grad():
        path = gen.sample(z, cond, torch.Generator().manual_seed(9))
    for stop in range(3):
        x_s, s = gen.state_after(z, cond, stop, noise=path.noise)
        torch.testing.assert_close(x_s, path.states[:, stop + 1])
        torch.testing.assert_close(s, path.times[stop + 1].expand(8))
        # its gradient is that of the last transition from the detached state x_stop
        (grad,) = torch.autograd.grad(x_s.sum(), gen.body.mean)
        mean, std = gen.step(path.states[:, stop], gen.predict(path.states[:, stop], stop, cond), stop)
        (expected,) = torch.autograd.grad((mean + std[:, None] * path.noise[:, stop]).sum(), gen.body.mean)
        torch.testing.assert_close(grad, expected)
    image, s = gen.state_after(z, cond, 3, noise=path.noise)
    torch.testing.assert_close(image, path.image)
    assert bool((s == 0).all())
    with pytest.raises(ValueError, match=r"^stop"):
        gen.state_after(z, cond, 4)


@pytest.mark.parametrize("schedule", [VP, FLOW], ids=["vp", "flow"])
def test_forward_is_the_deterministic_k_step_solve(schedule):
    body = GaussianDenoiser(MU, SIGMA, schedule)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cond = body.encode_prompts([""] * 16)
    gen = FewStepGenerator(body, 4, eta=1.0, sampler="cps")
    reference = solve(lambda x, t: body.predict_x0(x, t, {}), z, torch.ones(16, dtype=torch.float64), 4, schedule)
    torch.testing.assert_close(gen(z, cond), reference)
    one = FewStepGenerator(body, 1, times=[0.9])
    torch.testing.assert_close(one(z, cond), OneStepGenerator(body, t_star=0.9)(z, cond))


def test_dmd2_trains_a_few_step_generator_through_align():
    teacher = GaussianDenoiser(MU, SIGMA, FLOW).frozen()
    start = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    gen = FewStepGenerator(GaussianDenoiser(*start, FLOW).trainable_copy(), 3, sampler="cps")
    fake = GaussianDenoiser(*start, FLOW).trainable_copy()

    before = gen.body.mean.detach().clone()
    result = align(
        gen, DMD2(teacher, fake), teacher.encode_prompts([""]), steps=40, batch_size=64, fake=fake,
        fake_loss=FakeScoreLoss(fake), lr=3e-2, adam_betas=(0.9, 0.999),
    )  # fmt: skip
    assert len(result.history) == 40 and math.isfinite(result.history[-1]["loss"])
    # the generator's mean moves from 0 toward the teacher's (0.5, -0.3)
    assert (gen.body.mean.detach() - MU).norm() < 0.5 * (before - MU).norm()


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"steps": 0}, "steps"),
        ({"eta": 1.5}, "eta"),
        ({"eta": -0.1}, "eta"),
        ({"sampler": "euler"}, "sampler"),
        ({"times": [1.0, 0.5]}, "times"),
        ({"times": [1.0, 0.5, 0.6, 0.2]}, "times"),
        ({"times": [1.2, 0.7, 0.5, 0.2]}, "times"),
    ],
)
def test_bad_settings_name_their_key(settings, key):
    steps = settings.pop("steps", 4)
    with pytest.raises(ValueError, match=rf"^{key}"):
        FewStepGenerator(GaussianDenoiser(MU, SIGMA, FLOW), steps, **settings)


def test_sde_needs_a_flow_schedule_and_eta_zero_has_no_log_density():
    with pytest.raises(ValueError, match=r"^sampler: 'sde'"):
        FewStepGenerator(GaussianDenoiser(MU, SIGMA, VP), 4, sampler="sde")
    gen = gaussian_generator(FLOW, steps=2, sampler="cps", eta=0.0)
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^eta = 0.0"):
        gen.log_prob(x, x, 0, gen.body.encode_prompts([""]))
