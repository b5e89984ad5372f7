"""The on-policy RL loop on a few-step generator: exact resume, checkpoints, metric log, progress bar and reward
improvement (issue 16, deliverable 2; docs/algorithm.md §8.5)."""

import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from didr.backbones.gaussian import GaussianDenoiser
from didr.diffusion import FlowSchedule
from didr.fewstep import FewStepGenerator
from didr.objectives.grpo import GRPO
from didr.objectives.sdpo import SDPO
from didr.rewards.analytic import QuadraticReward
from didr.training.checkpoint import CheckpointError, Preempted
from didr.training.rl import train_policy

REWARD = QuadraticReward(torch.tensor([1.0, 0.5]), torch.tensor([[2.0, 0.3], [0.3, 0.5]]))
PROMPTS = GaussianDenoiser(torch.zeros(2), torch.eye(2), FlowSchedule()).encode_prompts(["a", "b"])
EPOCHS = 6


def generator():
    body = GaussianDenoiser(torch.tensor([0.5, -0.3]), torch.tensor([[1.0, 0.6], [0.6, 0.52]]), FlowSchedule())
    return FewStepGenerator(body.trainable_copy(), 3, eta=0.9, sampler="cps")


def sdpo():
    return SDPO(prompts=2, transitions=2, buffer_size=8, min_count=4, clip_range=0.05)


def run(folder, make_method=sdpo, **kwargs):
    """(generator, method, result) of a fresh run in `folder` (SDPO by default: its buffers are state to resume)."""
    settings = dict(
        epochs=EPOCHS, groups=4, groups_per_update=2, inner_epochs=2, lr=1e-2, checkpoint_dir=Path(folder) / "ckpt",
        checkpoint_every=2, metrics_path=Path(folder) / "metrics.parquet", params={"reward": "quadratic"},
    )  # fmt: skip
    gen, method = generator(), make_method()
    return gen, method, train_policy(gen, method, REWARD, PROMPTS, **(settings | kwargs))


def signal_at(epoch):
    def hook(e, logs):
        if e == epoch:
            os.kill(os.getpid(), signal.SIGUSR1)

    return hook


def final_checkpoint(folder):
    with safe_open(Path(folder) / "ckpt" / f"step-{EPOCHS:06d}.safetensors", "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)


def without_times(rows):
    return [{k: v for k, v in row.items() if k != "step_seconds"} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    return folder, *run(folder)


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resume_after_preemption_is_bit_identical(uninterrupted, tmp_path, stop_after):
    folder_a, gen_a, method_a, result_a = uninterrupted
    with pytest.raises(Preempted) as stop:
        run(tmp_path, on_epoch=signal_at(stop_after - 1))
    assert stop.value.step == stop_after and stop.value.checkpoint.name == f"step-{stop_after:06d}.safetensors"
    gen_b, method_b, result_b = run(tmp_path, resume=True)
    for (name, a), b in zip(gen_a.state_dict().items(), gen_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(method_a.normaliser.values, method_b.normaliser.values)
    assert torch.equal(method_a.normaliser.counts, method_b.normaliser.counts)
    assert method_b.normaliser.counts.sum().item() == EPOCHS * 4 * 2 * 2  # no epoch sampled twice
    assert without_times(result_a.history) == without_times(result_b.history)
    assert [row["step"] for row in result_b.history] == list(range(EPOCHS))
    logs = [pd.read_parquet(Path(f) / "metrics.parquet").drop(columns="step_seconds") for f in (folder_a, tmp_path)]
    pd.testing.assert_frame_equal(*logs, check_exact=True)
    (meta_a, tensors_a), (meta_b, tensors_b) = final_checkpoint(folder_a), final_checkpoint(tmp_path)
    assert meta_a == meta_b and tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    assert any(k.startswith("method/") for k in tensors_a) and any(k.startswith("policy_opt/") for k in tensors_a)


def test_checkpoints_belong_to_their_run(uninterrupted, tmp_path):
    folder = uninterrupted[0]
    assert sorted(p.name for p in (folder / "ckpt").iterdir()) == ["step-000004.safetensors", "step-000006.safetensors"]
    with pytest.raises(ValueError, match="pass resume=True"):
        run(folder)
    with pytest.raises(CheckpointError, match="params differs"):
        run(folder, resume=True, params={"reward": "other"})


def test_each_method_raises_the_reward_of_a_few_step_generator(tmp_path, capsys):
    for name, make in [("sdpo", sdpo), ("grpo", lambda: GRPO(group_size=8, clip_range=0.2))]:
        _, _, result = run(
            tmp_path / name, make, epochs=30, groups=8, lr=3e-2, inner_epochs=1, groups_per_update=None, progress=True
        )
        rewards = [row["reward"] for row in result.history]
        assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3, name
    assert "policy: 100%" in capsys.readouterr().err


def test_bad_loop_settings_name_their_key():
    with pytest.raises(ValueError, match=r"^epochs, groups"):
        train_policy(generator(), sdpo(), REWARD, PROMPTS, epochs=0, groups=2)
    with pytest.raises(ValueError, match=r"^eta"):
        gen = FewStepGenerator(generator().body, 3, eta=0.0, sampler="cps")
        train_policy(gen, sdpo(), REWARD, PROMPTS, epochs=1, groups=2)


def test_a_non_finite_loss_names_the_epoch(tmp_path):
    def broken(images, prompts):
        return images.sum(1) * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite policy loss at epoch 0; last good checkpoint: none"):
        train_policy(generator(), sdpo(), broken, PROMPTS, epochs=2, groups=2, checkpoint_dir=tmp_path)


DIFFUSERS_FAMILIES = ["sd-eps-pixel", "sd-v-latent", "pixart", "sd3-flow", "sdxl", "flux-dev", "zimage"]


@pytest.mark.integration
@pytest.mark.parametrize("family", DIFFUSERS_FAMILIES)
def test_few_step_methods_run_through_each_diffusers_family(family, tmp_path):
    """SDPO, GRPO and DMD2 train a 2-step generator on each tiny real backbone (DDIM-eta on VP, CPS on flow);
    on the flow ones AC-DMD's generator and fake losses backpropagate from an intermediate state."""
    from test_align_diffusers import BUILDERS, PROMPTS, brightness, changed, snapshot

    from didr.backbones.loading import load_denoiser
    from didr.objectives import DMD2, FakeScoreLoss
    from didr.objectives.acdmd import ACDMD
    from didr.training.loop import align

    BUILDERS[family](tmp_path)
    teacher = load_denoiser(tmp_path).frozen()
    flow = teacher.schedule.kind == "flow"
    settings = {"sampler": "cps", "eta": 0.9} if flow else {"sampler": "ddim", "eta": 1.0}
    prompts = teacher.encode_prompts(PROMPTS)
    before_teacher = snapshot(teacher)
    for make in (lambda: SDPO(prompts=len(PROMPTS), transitions=1), lambda: GRPO(group_size=2, clip_range=0.2)):
        gen = FewStepGenerator.from_teacher(teacher, 2, **settings)
        before = snapshot(gen)
        result = train_policy(gen, make(), brightness, prompts, epochs=1, groups=1, lr=1e-3)
        assert torch.isfinite(torch.tensor(result.history[0]["loss"])) and changed(before, gen)
    gen, fake = FewStepGenerator.from_teacher(teacher, 2, **settings), teacher.trainable_copy()
    before = snapshot(gen)
    align(gen, DMD2(teacher, fake), prompts, steps=1, batch_size=2, fake=fake, fake_loss=FakeScoreLoss(fake))
    assert changed(before, gen)
    if flow:
        objective, rng = ACDMD(teacher, fake), torch.Generator().manual_seed(0)
        z = torch.randn(2, *gen.sample_shape, generator=rng)
        cond = prompts.select(torch.tensor([0, 1]))
        x_s, s = gen.state_after(z, cond, 0, rng)  # x_1 at s = t_1 = 0.5, differentiable in the generator
        loss, _ = objective.generator_loss(x_s, s, cond, rng)
        loss.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
        fake_loss, logs = objective.fake_loss(x_s, s, cond, rng)
        fake_loss.mean().backward()
        assert torch.isfinite(fake_loss).all() and logs["loss_consistency"] >= 0
    assert not changed(before_teacher, teacher)
