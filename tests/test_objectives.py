"""The objectives' gradients, their shared machinery and their argument checks (issue 2, item 5 and the bar)."""

import pytest
import torch

from didr.backbones.gaussian import GaussianDenoiser
from didr.config import AlignParams
from didr.diffusion import FlowSchedule, UniformTime, VPSchedule, cosine_vp_config
from didr.methods import build_objective
from didr.objectives import DI, DIDR, DMD2, DIPlusPlus, FakeScoreLoss, RewardOnly
from didr.objectives.drs import DiffusedRewardProxy
from didr.rewards.analytic import QuadraticReward
from didr.training.loop import align

SCHEDULE = VPSchedule.from_scheduler_config(cosine_vp_config())
REWARD = QuadraticReward(torch.tensor([1.0, 1.0]), torch.tensor([[2.0, 0.3], [0.3, 0.5]]))
TIMES = UniformTime(0.02, 0.98)


class CountingGaussian(GaussianDenoiser):
    """A Gaussian reference that counts its network evaluations (one per batch of predictions)."""

    calls = 0

    def predict_x0(self, x_t, t, embeds):
        self.calls += 1
        return super().predict_x0(x_t, t, embeds)


def teacher(schedule=SCHEDULE, cls=GaussianDenoiser):
    return cls(torch.tensor([0.5, -0.3]), torch.tensor([[1.0, 0.6], [0.6, 0.52]]), schedule).frozen()


def fake(schedule=SCHEDULE):
    return GaussianDenoiser(torch.tensor([0.1, 0.4]), torch.tensor([[0.5, -0.1], [-0.1, 0.8]]), schedule).frozen()


def batch(n=64, seed=3):
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) * 1.5
    return x0.requires_grad_(True), teacher().encode_prompts([""] * n)


def replay(seed, n, sampler=TIMES, schedule=SCHEDULE):
    """The (t, eps) an objective draws from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    t = sampler(n, g)
    eps = torch.randn(n, 2, generator=g)
    a, s = schedule.alpha_sigma(t)
    return t, eps, a[:, None], s[:, None]


def grad_of(objective, x0, cond, seed=11):
    loss, logs = objective(x0, cond, torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad(loss.sum(), x0)
    return grad, logs


@pytest.mark.parametrize("weighting", ["uniform", "snr", "dmd2"])
def test_di_gradient_is_weighted_fake_minus_teacher(weighting):
    ref, fk = teacher(), fake()
    x0, cond = batch()
    grad, logs = grad_of(DI(ref, fk, TIMES, weighting=weighting), x0, cond)
    t, eps, a, s = replay(11, 64)
    x_t = a * x0.detach() + s * eps
    x0_ref = ref.predict_x0(x_t, t, {})
    direction = fk.predict_x0(x_t, t, {}) - x0_ref
    weight = {
        "uniform": torch.ones(64, 1),
        "snr": a**2 / s**2,
        "dmd2": 1 / (x0.detach() - x0_ref).abs().mean(1, keepdim=True),
    }[weighting]
    torch.testing.assert_close(grad, weight * direction)
    assert set(logs) == {"loss_ikl", "direction_norm", "update_norm_matching"}
    assert logs["update_norm_matching"] == pytest.approx((weight * direction).norm(dim=1).mean().item(), rel=1e-6)


def test_dipp_adds_the_terminal_reward_gradient():
    ref, fk = teacher(), fake()
    x0, cond = batch()
    grad_di, _ = grad_of(DI(ref, fk, TIMES), x0, cond)
    grad_dipp, logs = grad_of(DIPlusPlus(ref, fk, REWARD, alpha_rew=3.0, time_sampling=TIMES), x0, cond)
    reward_grad = -(x0.detach() - REWARD.centre) @ REWARD.precision  # grad of -0.5 d^T Q d
    torch.testing.assert_close(grad_dipp, grad_di - 3.0 * reward_grad)
    assert logs["reward"] == pytest.approx(REWARD(x0.detach()).mean().item())


def test_reward_only_gradient_is_minus_reward_gradient():
    x0, cond = batch()
    grad, _ = grad_of(RewardOnly(teacher(), REWARD), x0, cond)
    torch.testing.assert_close(grad, (x0.detach() - REWARD.centre) @ REWARD.precision)


def test_didr_gradient_shifts_the_target_by_the_damped_capped_drs():
    ref, fk = teacher(), fake()
    x0, cond = batch(256)
    beta, t_max = 0.8, 0.6
    objective = DIDR(
        ref, fk, REWARD, beta, t_max=t_max, gamma=lambda t: 1 - t, time_sampling=TIMES, weighting="uniform"
    )
    grad, logs = grad_of(objective, x0, cond)
    t, eps, a, s = replay(11, 256)
    x_t = (a * x0.detach() + s * eps).requires_grad_(True)
    x0_ref = ref.predict_x0(x_t, t, {})
    (drs,) = torch.autograd.grad(REWARD(x0_ref).sum() / beta, x_t)  # the Tweedie proxy, by hand
    damping = ((t <= t_max).float() * (1 - t))[:, None]
    expected = fk.predict_x0(x_t, t, {}) - (x0_ref + damping * s**2 / a * drs)
    torch.testing.assert_close(grad, expected.detach())
    assert (t > t_max).any() and (t <= t_max).any()
    assert logs["drs_norm"] > 0


def test_didr_without_reward_is_exactly_dmd2():
    """With the DMD2 normaliser and DRS = 0, DIDR's gradient is DMD2's (docs/algorithm.md §5.2)."""
    ref, fk = teacher(), fake()
    x0, cond = batch()
    times = UniformTime(20 / 999, 980 / 999)
    grad_dmd2, _ = grad_of(DMD2(ref, fk, times), x0, cond)
    zero_drs = DIDR(ref, fk, drs=lambda x_t, t, c: torch.zeros_like(x_t), time_sampling=times, weighting="dmd2")
    grad_didr, _ = grad_of(zero_drs, x0, cond)
    torch.testing.assert_close(grad_didr, grad_dmd2)
    assert grad_dmd2.abs().max() > 0.1


def test_dmd2_hinge_reward_only_acts_below_the_margin():
    ref, fk = teacher(), fake()
    x0, cond = batch()
    plain, _ = grad_of(DMD2(ref, fk), x0, cond)
    hinged, _ = grad_of(DMD2(ref, fk, reward=REWARD, reward_weight=2.0, reward_hinge=-1.0), x0, cond)
    below = REWARD(x0.detach()) < -1.0
    reward_grad = -(x0.detach() - REWARD.centre) @ REWARD.precision
    torch.testing.assert_close(hinged[below], plain[below] - 2.0 * reward_grad[below])
    torch.testing.assert_close(hinged[~below], plain[~below])
    assert below.any() and (~below).any()


@pytest.mark.parametrize(("mode", "steps", "calls"), [("tweedie", 1, 1), ("k-step", 3, 3), ("hybrid", 3, 3)])
def test_didr_shares_the_teacher_forward_between_target_and_proxy(mode, steps, calls):
    ref = teacher(cls=CountingGaussian)
    x0, cond = batch()
    DIDR(ref, fake(), REWARD, 1.0, drs=mode, drs_steps=steps, time_sampling=TIMES)(x0, cond, torch.Generator())
    assert ref.calls == calls


def test_no_gradient_reaches_the_generator_through_the_proxy():
    """The generator's gradient is u G only: the DRS carries no graph back to x0 (no second-order terms)."""
    ref, fk = teacher(), fake()
    x0, cond = batch()
    grad, _ = grad_of(DIDR(ref, fk, REWARD, 1.0, drs="k-step", drs_steps=2, t_max=1.0, weighting="uniform"), x0, cond)
    t, eps, a, s = replay(11, 64)
    x_t = a * x0.detach() + s * eps
    proxy = DiffusedRewardProxy(ref, REWARD, 1.0, "k-step", steps=2)
    drs, x0_ref = proxy(x_t, t, cond)
    torch.testing.assert_close(grad, fk.predict_x0(x_t, t, {}) - x0_ref - s**2 / a * drs)


@pytest.mark.parametrize("mode", ["k-step", "hybrid"])
def test_proxy_checkpointing_changes_nothing(mode):
    ref = teacher(FlowSchedule())
    x0, cond = batch()
    t = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    x_t = ref.schedule.diffuse(x0.detach(), torch.randn_like(x0), t)
    plain = DiffusedRewardProxy(ref, REWARD, 0.5, mode, steps=3)(x_t, t, cond)[0]
    saved = DiffusedRewardProxy(ref, REWARD, 0.5, mode, steps=3, checkpoint=True)(x_t, t, cond)[0]
    torch.testing.assert_close(plain, saved)


def test_k_step_and_hybrid_differ_from_tweedie_for_a_curved_reward():
    ref = teacher()
    x0, cond = batch()
    t = torch.full((64,), 0.7)
    x_t = ref.schedule.diffuse(x0.detach(), torch.randn_like(x0), t)
    tweedie = DiffusedRewardProxy(ref, REWARD, 1.0)(x_t, t, cond)[0]
    for mode in ("k-step", "hybrid"):
        other = DiffusedRewardProxy(ref, REWARD, 1.0, mode, steps=4)(x_t, t, cond)[0]
        assert (other - tweedie).norm() > 0.05 * tweedie.norm()


def test_fake_score_loss_weightings():
    fk = fake()
    x0, cond = batch()
    eps_loss, _ = FakeScoreLoss(fk, TIMES, "eps")(x0, cond, torch.Generator().manual_seed(5))
    x0_loss, logs = FakeScoreLoss(fk, TIMES, "x0")(x0, cond, torch.Generator().manual_seed(5))
    t, eps, a, s = replay(5, 64)
    x_t = a * x0.detach() + s * eps
    expected = ((fk.predict_x0(x_t, t, {}) - x0.detach()) ** 2).mean(1)
    torch.testing.assert_close(x0_loss, expected)
    torch.testing.assert_close(eps_loss, expected * (a**2 / s**2)[:, 0])
    assert logs["loss_fake"] == pytest.approx(expected.mean().item())


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda r, f: build_objective("didrr", 1.0, r, f, REWARD, AlignParams()), "method"),
        (lambda r, f: DIDR(r, f, REWARD, beta=0.0), "beta"),
        (lambda r, f: DIDR(r, f, REWARD, beta=-1.0), "beta"),
        (lambda r, f: DIDR(r, f, REWARD, drs="k-step", drs_steps=0), "drs_steps"),
        (lambda r, f: DIDR(r, f, REWARD, drs="tweedie", drs_steps=2), "drs_steps"),
        (lambda r, f: DIDR(r, f, REWARD, t_max=0.0), "t_max"),
        (lambda r, f: DIDR(r, f, REWARD, t_max=1.2), "t_max"),
        (lambda r, f: DIDR(r, f, REWARD, drs="second-order"), "drs"),
        (lambda r, f: DIDR(r, f, drs="tweedie"), "reward"),
        (lambda r, f: DIDR(r, f, REWARD, weighting="sqrt"), "weighting"),
        (lambda r, f: DIPlusPlus(r, f, REWARD, alpha_rew=-1.0), "alpha_rew"),
        (lambda r, f: DMD2(r, f, reward_weight=1.0), "reward"),
        (lambda r, f: FakeScoreLoss(f, weighting="v"), "fake_weighting"),
        (lambda r, f: r.make_generator(t_star=0.0), "t_star"),
        (lambda r, f: UniformTime(0.5, 0.2), "t_min"),
    ],
)
def test_bad_arguments_raise_one_clear_error_naming_the_parameter(build, names):
    with pytest.raises(ValueError, match=names) as info:
        build(teacher(), fake())
    assert "\n" not in str(info.value)


def train_small(seed, steps=20, objective_factory=None):
    ref = teacher()
    generator, fk = ref.make_generator(0.9), ref.trainable_copy()
    objective = (objective_factory or (lambda: DIDR(ref, fk, REWARD, 1.0, time_sampling=TIMES)))()
    return align(
        generator, objective, ref.encode_prompts([""]), steps=steps, batch_size=16, fake=fk,
        fake_loss=FakeScoreLoss(fk, TIMES), fake_updates=2, lr=1e-2, seed=seed,
    )  # fmt: skip


def test_alignment_loop_is_reproducible_from_its_seed():
    first, again, other = train_small(0), train_small(0), train_small(1)
    assert torch.equal(first.generator.weight, again.generator.weight)
    assert not torch.equal(first.generator.weight, other.generator.weight)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in again.history]
    assert {"loss", "grad_norm", "loss_fake", "drs_norm", "direction_norm"} <= set(first.history[-1])


def test_alignment_loop_ema_trails_the_generator():
    result = train_small(0, steps=30)
    moved = (result.generator.weight - teacher().make_generator(0.9).weight).norm()
    lag = (result.ema.weight - result.generator.weight).norm()
    assert moved > 0 and 0 < lag < moved


def test_alignment_loop_ema_updates_only_the_trained_tensors():
    """Frozen tensors (a LoRA's bases) are shared by the generator and its EMA: the EMA step leaves them untouched."""
    ref = teacher()
    generator, fk = ref.make_generator(0.9), ref.trainable_copy()
    generator.bias.requires_grad_(False)
    version = generator.bias._version
    result = align(
        generator, DI(ref, fk, TIMES), ref.encode_prompts([""]), steps=3, batch_size=8, fake=fk,
        fake_loss=FakeScoreLoss(fk, TIMES), lr=1e-2,
    )  # fmt: skip
    assert result.ema.bias is generator.bias and generator.bias._version == version  # no in-place write at all
    assert not torch.equal(result.ema.weight, generator.weight)


def test_alignment_loop_stops_on_a_non_finite_loss():
    def exploding(x0, cond, generator):
        return x0.sum(1) * float("nan"), {}

    with pytest.raises(FloatingPointError, match="step 0"):
        train_small(0, objective_factory=lambda: exploding)


def test_dmd2_logs_its_matching_and_reward_update_norms():
    """The logged parts of the update in x0 (docs/algorithm.md §4.5) against the hand-computed directions."""
    ref, fk = teacher(), fake()
    x0, cond = batch()
    times = UniformTime(20 / 999, 980 / 999)
    grad, logs = grad_of(DMD2(ref, fk, times, reward=REWARD, reward_weight=2.0), x0, cond)
    t, eps, a, s = replay(11, 64, times)
    x_t = a * x0.detach() + s * eps
    x0_real = ref.predict_x0(x_t, t, {})
    matching = (fk.predict_x0(x_t, t, {}) - x0_real) / (x0.detach() - x0_real).abs().mean(1, keepdim=True)
    reward_part = 2.0 * (x0.detach() - REWARD.centre) @ REWARD.precision  # grad of -2 r
    torch.testing.assert_close(grad, matching + reward_part)
    assert logs["update_norm_matching"] == pytest.approx(matching.norm(dim=1).mean().item(), rel=1e-5)
    assert logs["update_norm_reward"] == pytest.approx(reward_part.norm(dim=1).mean().item(), rel=1e-5)
    hinged = DMD2(ref, fk, times, reward=REWARD, reward_weight=2.0, reward_hinge=-1.0)
    _, logs = grad_of(hinged, x0, cond)
    below = (REWARD(x0.detach()) < -1.0).float()[:, None]
    assert logs["update_norm_reward"] == pytest.approx((below * reward_part).norm(dim=1).mean().item(), rel=1e-5)


def test_dipp_logs_the_reward_part_of_its_update():
    x0, cond = batch()
    _, logs = grad_of(DIPlusPlus(teacher(), fake(), REWARD, alpha_rew=3.0, time_sampling=TIMES), x0, cond)
    reward_grad = (x0.detach() - REWARD.centre) @ REWARD.precision
    assert logs["update_norm_reward"] == pytest.approx(3.0 * reward_grad.norm(dim=1).mean().item(), rel=1e-5)


def test_didr_logs_the_drs_shift_against_the_matching_direction_by_time():
    ref, fk = teacher(), fake()
    x0, cond = batch(256)
    beta = 0.8
    _, logs = grad_of(DIDR(ref, fk, REWARD, beta, t_max=1.0, time_sampling=TIMES, weighting="uniform"), x0, cond)
    t, eps, a, s = replay(11, 256)
    x_t = (a * x0.detach() + s * eps).requires_grad_(True)
    x0_ref = ref.predict_x0(x_t, t, {})
    (drs,) = torch.autograd.grad(REWARD(x0_ref).sum() / beta, x_t)
    shift, matching = s**2 / a * drs, (fk.predict_x0(x_t, t, {}) - x0_ref).detach()
    assert logs["update_norm_matching"] == pytest.approx(matching.norm(dim=1).mean().item(), rel=1e-5)
    assert logs["update_norm_reward"] == pytest.approx(shift.norm(dim=1).mean().item(), rel=1e-5)
    late = ((t >= 0.5) & (t <= 1.0)).float()
    assert logs["drs_shift_t0.50-1.00"] == pytest.approx((late * shift.norm(dim=1)).mean().item(), rel=1e-5)
    assert logs["matching_t0.50-1.00"] == pytest.approx((late * matching.norm(dim=1)).mean().item(), rel=1e-5)
    bins = ["0.00-0.50", "0.50-1.00"]
    assert sum(logs[f"drs_shift_t{b}"] for b in bins) == pytest.approx(logs["update_norm_reward"], rel=1e-5)
    assert sum(logs[f"matching_t{b}"] for b in bins) == pytest.approx(logs["update_norm_matching"], rel=1e-5)
    early, high = (logs[f"drs_shift_t{b}"] / logs[f"matching_t{b}"] for b in bins)
    assert early < high  # s^2 / a grows with t


@pytest.mark.parametrize("clip", [1e-3, None])
def test_alignment_loop_clips_on_the_per_element_mean_scale_and_logs_it(clip):
    """grad_clip is DMD2's max_grad_norm on a per-element mean loss: the summed loss's gradient (2 elements per
    sample here) is clipped at 2 x clip, and the applied norm on the mean scale equals the clip."""
    ref = teacher()
    generator, fk = ref.make_generator(0.9), ref.trainable_copy()
    result = align(
        generator, DMD2(ref, fk, TIMES, reward=REWARD, reward_weight=1.0), ref.encode_prompts([""]), steps=3,
        batch_size=16, fake=fk, fake_loss=FakeScoreLoss(fk, TIMES), lr=1e-2, grad_clip=clip,
    )  # fmt: skip
    for row in result.history:
        assert row["grad_norm_mean_scale"] == pytest.approx(row["grad_norm"] / 2)
        assert row["grad_norm_mean_scale"] > 1e-2
        if clip is None:
            assert row["grad_clipped"] == 0 and row["grad_clipped_fake"] == 0
            assert row["grad_norm_applied_mean_scale"] == pytest.approx(row["grad_norm_mean_scale"], rel=1e-6)
        else:
            assert row["grad_clipped"] == 1 and row["grad_clipped_fake"] == 1
            assert row["grad_norm_applied_mean_scale"] == pytest.approx(clip, rel=1e-3)
        assert {"update_norm_matching", "update_norm_reward"} <= set(row)
