"""AC-DMD and RTDMD as grid methods (issue 16; docs/algorithm.md §8.7): the loop's fake-score target and generator
direction at intermediate states equal the closed forms on a Gaussian few-step problem, RTDMD's SubGRPO and its
last-step hinge raise the reward, a preempted run resumes bit-identically across the stage switch, bad settings stop
at load naming the key, and both methods run end to end through `didr align` on a tiny flow world."""

import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from pipeline_project import tiny_params

from didr.backbones.gaussian import GaussianDenoiser
from didr.cli import main
from didr.config import ConfigError, load_params
from didr.diffusion import FlowSchedule, UniformTime
from didr.fewstep import FewStepGenerator
from didr.methods import build_rtdmd_method, get_method, rtdmd_methods
from didr.objectives.acdmd import ACDMD, renoise_coefficients
from didr.objectives.grpo import GRPO, clipped_policy_loss
from didr.objectives.rtdmd import RTDMD
from didr.rewards.analytic import QuadraticReward
from didr.training.checkpoint import Preempted
from didr.training.loop import draw_batch
from didr.training.rl import rollout
from didr.training.rtdmd import acdmd_fake_loss, acdmd_generator_loss, rollout_state, stop_state, train_rtdmd

FLOW = FlowSchedule()
MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.52]], dtype=torch.float64)
START = torch.tensor([1.5, 0.7], dtype=torch.float64)
TIMES = UniformTime(0.02, 0.98)
REWARD = QuadraticReward(torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([[2.0, 0.3], [0.3, 0.5]]))
TEACHER = GaussianDenoiser(MU, SIGMA, FLOW).frozen()
PROMPTS = TEACHER.encode_prompts(["a", "b"])
STEPS = 3  # network evaluations of the few-step generator
ROOT_PRESETS = Path(__file__).resolve().parents[1] / "presets"


def generator():
    return FewStepGenerator(GaussianDenoiser(START, SIGMA, FLOW).trainable_copy(), STEPS, eta=0.9, sampler="cps")


def fake():
    return GaussianDenoiser(START, 0.8 * SIGMA, FLOW).trainable_copy()


def method(fake_score, consistency_weight=0.01, **kwargs):
    return RTDMD(ACDMD(TEACHER, fake_score, TIMES, eta=0.9, consistency_weight=consistency_weight), **kwargs)


def replay(gen, seed, batch):
    """The loop's draws for one AC-DMD batch, by hand: prompts and z, the stop step, the transitions' noise, and
    (x_s, s) read off the full trajectory; the generator's gradients flow into x_s."""
    rng = torch.Generator().manual_seed(seed)
    z, cond = draw_batch(gen, PROMPTS, batch, rng)
    stop = int(torch.randint(STEPS, (1,), generator=rng))
    noise = torch.randn((batch, STEPS - 1, 2), generator=rng, dtype=torch.float64)
    with torch.no_grad():
        trajectory = gen.sample(z, cond, noise=noise)
    x_s, s = gen.state_after(z, cond, stop, noise=noise)
    torch.testing.assert_close(x_s.detach(), rollout_state(trajectory, stop)[0], rtol=0, atol=1e-12)
    return rng, cond, stop, x_s, s


def test_the_loop_stops_at_every_step_and_trains_on_the_trajectory_state():
    gen, stops = generator(), set()
    for seed in range(12):
        rng = torch.Generator().manual_seed(seed)
        z, cond = draw_batch(gen, PROMPTS, 8, rng)
        x_s, s = stop_state(gen, z, cond, rng)
        _, _, stop, expected, expected_s = replay(gen, seed, 8)
        assert torch.equal(x_s, expected) and torch.equal(s, expected_s)
        assert s[0].item() == pytest.approx([2 / 3, 1 / 3, 0.0][stop])  # t_{k+1}, or the image at s = 0
        stops.add(stop)
    assert stops == {0, 1, 2}


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_the_loops_fake_target_is_the_closed_form_dsm_target(seed):
    """d/dpsi of the loop's fake loss equals d/dpsi mean ||v_psi(x_t, t) - v*||^2 with v* = -(x_t + t S) / (1 - t),
    S = -n / sigma the score of x_t | x_s (the DSM form of §8.2, computed here from the replayed draws)."""
    gen, fk = generator(), fake()
    loss, _ = acdmd_fake_loss(gen, method(fk, consistency_weight=0.0), PROMPTS, 16, torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(loss.mean(), list(fk.parameters()))
    rng, cond, _, x_s, s = replay(gen, seed, 16)
    x_s = x_s.detach()
    t = s + (1 - s) * TIMES(16, rng).double()
    n = torch.randn(x_s.shape, generator=rng, dtype=torch.float64)
    scale, sigma = renoise_coefficients(s, t)
    x_t = scale[:, None] * x_s + sigma[:, None] * n
    target = -(x_t - t[:, None] * n / sigma[:, None]) / (1 - t)[:, None]
    velocity = (x_t - fk.x0(x_t, t, cond)) / t[:, None]
    expected = torch.autograd.grad(((velocity - target) ** 2).mean(1).mean(), list(fk.parameters()))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert max(g.abs().max().item() for g in got) > 0.01


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_the_loops_generator_direction_is_the_cps_image_of_the_x0_difference(seed):
    """d/dtheta of the loop's generator loss = sum_b G_b . dx_s,b / dtheta with G the closed form of
    tests/test_acdmd.py: [(1 - s) - s cos(eta pi / 2) (1 - t) / t] (x0_fake - x0_real) / mean |x_s - x_s^real|."""
    gen, fk = generator(), fake()
    params = list(gen.parameters())
    loss, _ = acdmd_generator_loss(gen, method(fk), PROMPTS, 16, torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(loss.sum(), params)
    rng, _, _, x_s, s = replay(gen, seed, 16)
    t = s + (1 - s) * TIMES(16, rng).double()
    noise = torch.randn(x_s.shape, generator=rng, dtype=torch.float64)
    shared = torch.randn(x_s.shape, generator=rng, dtype=torch.float64)
    scale, sigma = renoise_coefficients(s, t)
    x_t = scale[:, None] * x_s.detach() + sigma[:, None] * noise
    x0_real, x0_fake = TEACHER.predict_x0(x_t, t, {}), fk.predict_x0(x_t, t, {}).detach()
    c, sn = math.cos(0.9 * math.pi / 2), math.sin(0.9 * math.pi / 2)
    eps_real = (x_t - (1 - t)[:, None] * x0_real) / t[:, None]
    xs_real = (1 - s)[:, None] * x0_real + s[:, None] * (c * eps_real + sn * shared)
    factor = ((1 - s) - s * c * (1 - t) / t)[:, None]
    direction = factor * (x0_fake - x0_real) / (x_s.detach() - xs_real).abs().mean(1, keepdim=True)
    expected = torch.autograd.grad((direction * x_s).sum(), params)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert max(g.abs().max().item() for g in got) > 0.01


def expected_reward(gen, seed=123, n=4096):
    """E r of the stochastic K-step sampler, by Monte Carlo with the same draws each time (common random numbers)."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn((n, 2), generator=rng, dtype=torch.float64)
    with torch.no_grad():
        return REWARD(gen.sample(z, PROMPTS.select(torch.zeros(n, dtype=torch.long)), rng).image).mean().item()


def test_rtdmds_subgrpo_moves_the_expected_reward_up():
    """Stage 2 alone (no AC-DMD, no hinge): SubGRPO on one of the first two transitions per epoch, no KL. E r (Monte
    Carlo, 4096 samples, the same draws before and after; r <= 0) starts at -0.70 and 40 epochs of 8 groups of 16
    bring it above -0.2 (measured: -0.076)."""
    gen, fk = generator(), fake()
    rtdmd = method(fk, grpo=GRPO(group_size=16, clip_range=0.2, train_steps=1, step_range=2), reward=REWARD,
                   acdmd_weight=0.0)  # fmt: skip
    before = expected_reward(gen)
    result = train_rtdmd(gen, fk, rtdmd, PROMPTS, steps=40, batch_size=8, groups=8, lr=0.02, adam_betas=(0.9, 0.99))
    assert {row["stage"] for row in result.history} == {2.0}
    assert before < -0.6 and expected_reward(gen) > -0.2


def test_inner_epochs_are_generator_steps_on_one_rollout_with_ratios_against_it():
    """inner_epochs = 2 (§8.7): one rollout, then two generator steps on it, each followed by the EMA; the second
    pass's PPO ratios are against the rollout's log-densities, so its clip acts. Replayed by hand (the rollout from
    the loop's seed, the PPO sum at the trained transition, Adam twice): the weights and the EMA agree to 1e-12. The
    first pass's surrogate is -mean A = 0 (group-standardised advantages) and moves every parameter by lr (Adam's
    first step, lr sign g), as one pass does; the second pass's surrogate is below 0 and its clip acts on 26 of 32
    rows, so the two passes land more than 0.01 from one pass in every coordinate."""
    grpo = GRPO(group_size=8, clip_range=0.02, train_steps=1, step_range=2)
    settings = dict(steps=1, batch_size=8, groups=4, lr=0.05, adam_betas=(0.9, 0.99), grad_clip=None, ema_decay=0.5)

    def trained(inner_epochs):
        gen, fk = generator(), fake()
        rtdmd = method(fk, grpo=grpo, reward=REWARD, acdmd_weight=0.0)
        result = train_rtdmd(gen, fk, rtdmd, PROMPTS, inner_epochs=inner_epochs, **settings)
        return [p.detach().clone() for p in gen.parameters()], result

    (after_one, _), (after_two, result) = trained(1), trained(2)
    gen = generator()
    start = [p.detach().clone() for p in gen.parameters()]
    trajectory, cond, advantages, (k,), _ = rollout(gen, grpo, REWARD, PROMPTS, 4, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(list(gen.parameters()), lr=0.05, betas=(0.9, 0.99), weight_decay=0.0)
    ema, ratios, losses = [p.clone() for p in start], [], []
    for _ in range(2):
        log_prob = gen.log_prob(trajectory.states[:, k], trajectory.states[:, k + 1], k, cond)
        ratios.append((log_prob - trajectory.log_probs[:, k]).exp().detach())
        loss = clipped_policy_loss(log_prob, trajectory.log_probs[:, k], advantages[:, k], 0.02).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        ema = [e.lerp(p.detach(), 0.5) for e, p in zip(ema, gen.parameters(), strict=True)]
    for got, expected in zip(after_two, gen.parameters(), strict=True):
        torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-12)
    for got, expected in zip(result.ema.parameters(), ema, strict=True):
        torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-12)
    assert result.history[0]["loss_policy"] == pytest.approx(sum(losses) / 2, rel=1e-12)
    assert torch.equal(ratios[0], torch.ones(32, dtype=torch.float64)) and abs(losses[0]) < 1e-12  # on-policy
    assert int(((ratios[1] - 1).abs() > 0.02).sum()) == 26 and losses[1] < -0.005  # off-policy: the clip acts
    for one, two, begin in zip(after_one, after_two, start, strict=True):
        torch.testing.assert_close((one - begin).abs(), torch.full_like(begin, 0.05), rtol=0, atol=1e-6)
        assert bool(((two - one).abs() > 0.01).all())


def test_the_last_step_hinge_is_weight_times_the_reward_gradient_below_the_margin():
    """d/dx0 [w ReLU(h - r(x0))] = -w grad r = w Q (x0 - m) where r < h, 0 where r > h (AC-DMD weight 0)."""
    x0 = torch.tensor([[1.0, 0.5], [3.0, -2.0], [1.2, 0.4]], dtype=torch.float64, requires_grad=True)
    rtdmd = method(fake(), grpo=GRPO(group_size=2), reward=REWARD, reward_weight=0.5, reward_margin=-0.1,
                   acdmd_weight=0.0)  # fmt: skip
    loss, logs = rtdmd.last_step_loss(x0, TEACHER.encode_prompts(["a"] * 3), torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(loss.sum(), x0)
    below = (REWARD(x0.detach()) < -0.1)[:, None]
    expected = torch.where(below, 0.5 * (x0.detach() - REWARD.centre) @ REWARD.precision.double(), 0.0)
    torch.testing.assert_close(grad, expected)
    assert below.squeeze(1).tolist() == [False, True, False] and logs["loss_hinge"] > 0


def run_resumable(folder, **kwargs):
    gen, fk = generator(), fake()
    rtdmd = method(fk, grpo=GRPO(group_size=4, clip_range=0.2, train_steps=1, step_range=2), reward=REWARD,
                   reward_weight=0.1, acdmd_steps=2)  # fmt: skip
    result = train_rtdmd(
        gen, fk, rtdmd, PROMPTS, steps=5, batch_size=8, groups=2, fake_updates=2, lr=1e-2,
        checkpoint_dir=folder / "ckpt", checkpoint_every=2, metrics_path=folder / "metrics.parquet",
        params={"run": "rtdmd"}, **kwargs,
    )  # fmt: skip
    return gen, fk, result


def test_a_preempted_run_resumes_bit_identically_across_the_stage_switch(tmp_path):
    gen_a, fake_a, result_a = run_resumable(tmp_path / "a")

    def stop_at(step, logs):
        if step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(Preempted) as stopped:
        run_resumable(tmp_path / "b", on_step=stop_at)
    assert stopped.value.step == 2
    gen_b, fake_b, result_b = run_resumable(tmp_path / "b", resume=True)
    for a, b in [(gen_a, gen_b), (fake_a, fake_b), (result_a.ema, result_b.ema)]:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]  # noqa: E731
    assert strip(result_a.history) == strip(result_b.history)
    assert [row["stage"] for row in result_b.history] == [1.0, 1.0, 2.0, 2.0, 2.0]


def test_the_loop_refuses_a_non_cps_generator():
    gen = FewStepGenerator(GaussianDenoiser(START, SIGMA, FLOW).trainable_copy(), STEPS, eta=0.9, sampler="ddim")
    with pytest.raises(ValueError, match=r"^warmup.generator.sampler: acdmd / rtdmd need the 'cps' sampler"):
        train_rtdmd(gen, fake(), method(fake()), PROMPTS, steps=1, batch_size=2)


FLOW_WORLD = {"kind": "flow"}
GENERATOR = {"steps": STEPS, "sampler": "cps", "eta": 0.9}
POLICY = {"groups": 2, "group_size": 2, "train_steps": 1, "step_range": 2}


@pytest.mark.parametrize(
    ("teacher", "generator", "align", "message"),
    [
        ({}, GENERATOR, {}, "teacher.kind: rtdmd (AC-DMD) needs a flow teacher, got vp"),
        (FLOW_WORLD, {**GENERATOR, "sampler": "ddim"}, {}, "warmup.generator.sampler: rtdmd steps back with the 'cps'"),
        (FLOW_WORLD, {**GENERATOR, "steps": 1}, {}, "warmup.generator.steps: rtdmd trains a few-step generator"),
        (FLOW_WORLD, {**GENERATOR, "eta": 0.0}, {}, "warmup.generator.eta: rtdmd needs a stochastic sampler"),
        (FLOW_WORLD, GENERATOR, {"policy": {"group_size": 1}}, "align.policy.group_size: 1 is less than the minimum"),
        (FLOW_WORLD, GENERATOR, {"policy": {"train_steps": 3}}, "align.policy.train_steps: need train_steps <= step"),
        (FLOW_WORLD, GENERATOR, {"rtdmd": {"acdmd_steps": 4}}, "align.rtdmd.acdmd_steps: 4 leaves rtdmd no stage-2"),
    ],
)
def test_bad_rtdmd_settings_stop_at_load_naming_the_key(tmp_path, teacher, generator, align, message):
    params = tiny_params(teacher=teacher, warmup={"generator": generator}, align=align)
    params["grid"]["methods"] = {"rtdmd": {"weight": [1.0]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(error.value)


def cli(*args: str) -> int:
    return main([*args, "--quiet"])


def align_args(root, p, method, strength):
    return ["align", *p, "--teacher", str(root / "teacher"), "--warmup", str(root / "warmup"),
            "--out", str(root / f"align-{method}"), "--method", method, "--strength", strength]  # fmt: skip


@pytest.mark.integration
def test_acdmd_runs_through_didr_align(flow_world):
    """AC-DMD aligns the 3-step CPS generator of a tiny flow world through `didr align`, stage 1 at every step."""
    root, p = flow_world
    assert cli(*align_args(root, p, "acdmd", "0")) == 0
    record = json.loads((root / "align-acdmd" / "params.json").read_text())
    assert record["method"] == "acdmd" and record["generator"]["steps"] == STEPS
    assert pd.read_parquet(root / "align-acdmd" / "metrics.parquet")["stage"].tolist() == [1, 1, 1]


@pytest.mark.integration
def test_rtdmd_runs_through_didr_align_and_resumes_bit_identically(flow_world):
    """RTDMD (1 step of AC-DMD, then 2 of stage 2) through `didr align`; with its last checkpoint removed, a rerun
    resumes from the one before and writes the same bytes."""
    root, p = flow_world
    args, out = align_args(root, p, "rtdmd", "0.5"), root / "align-rtdmd"
    assert cli(*args) == 0
    record = json.loads((out / "params.json").read_text())
    assert record["method"] == "rtdmd" and record["strength"] == 0.5 and record["generator"]["steps"] == STEPS
    first = {name: (out / name).read_bytes() for name in ("generator.safetensors", "fake.safetensors")}
    (checkpoints,) = (root / "align-rtdmd.checkpoints").iterdir()
    (checkpoints / "step-000003.safetensors").unlink()
    shutil.rmtree(out)
    assert cli(*args) == 0
    assert {name: (out / name).read_bytes() for name in first} == first
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics["step"].tolist() == [0, 1, 2] and metrics["stage"].tolist() == [1, 2, 2]
    assert metrics["loss_hinge"].notna().tolist() == [False, True, True]


@pytest.fixture(scope="module")
def flow_world(tmp_path_factory):
    """A flow teacher smaller than the tiny params' (15 steps on 64 images, toy rewards 20 steps each: only the
    plumbing is under test) and its 3-step CPS warm start (eta 0.9, one fake-score step), made once; align runs 3
    steps (rtdmd: 1 of AC-DMD, then 2 of stage 2)."""
    root = tmp_path_factory.mktemp("rtdmd-world")
    teacher = {**FLOW_WORLD, "steps": 15, "n_images": 64, "reward_alignment_steps": 20, "reward_preference_steps": 20}
    params = tiny_params(
        teacher=teacher, warmup={"generator": GENERATOR, "steps": 1},
        align={"steps": 3, "checkpoint_every": 1, "policy": POLICY, "rtdmd": {"acdmd_steps": 1}},
    )  # fmt: skip
    params["grid"]["methods"] = {"acdmd": {}, "rtdmd": {"weight": [0.5]}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    p = ["--params", str(root / "params.yaml")]
    assert cli("teacher", *p, "--out", str(root / "teacher")) == 0
    assert cli("warmup", *p, "--teacher", str(root / "teacher"), "--out", str(root / "warmup")) == 0
    return root, p


def test_the_registry_builds_acdmd_and_rtdmd_from_the_align_settings():
    align = load_params(ROOT_PRESETS / "sd35-rtdmd.yaml").align
    fk = fake()
    acdmd = build_rtdmd_method("acdmd", 0.0, TEACHER, fk, REWARD, align, eta=0.9)
    assert acdmd.grpo is None and acdmd.stage(10**6) == 1 and acdmd.acdmd.consistency_weight == 0.01
    rtdmd = build_rtdmd_method("rtdmd", 1e-4, TEACHER, fk, REWARD, align, eta=0.9)
    assert (rtdmd.reward_weight, rtdmd.reward_margin, rtdmd.acdmd_weight) == (1e-4, 3.0, 1e-3)
    assert (rtdmd.grpo.group_size, rtdmd.grpo.clip_range, rtdmd.grpo.train_steps, rtdmd.grpo.step_range) == (
        24, 1e-5, 2, 2,
    )  # fmt: skip
    assert [rtdmd.stage(k) for k in (0, 14999, 15000)] == [1, 1, 2] and rtdmd.acdmd.eta == 0.9
    assert rtdmd_methods() == ["acdmd", "rtdmd"] and get_method("rtdmd").axis == "weight"
    with pytest.raises(ValueError, match="method: dmd2 trains with the align loop, not the rtdmd loop"):
        build_rtdmd_method("dmd2", 1.0, TEACHER, fk, REWARD, align, eta=0.9)
