"""Every method trains through real diffusers backbones, loaded from disk like real weights (tiny configs)."""

import pytest
import torch
from tiny_models import save_flux, save_pixart, save_sd, save_sd3, save_sdxl, save_zimage

from didr.backbones.loading import load_denoiser
from didr.backbones.tuning import add_lora
from didr.generator import OneStepGenerator
from didr.objectives import DI, DIDR, DMD2, DIPlusPlus, FakeScoreLoss, RewardOnly
from didr.training.loop import align

BUILDERS = {
    "sd-eps-pixel": lambda folder: save_sd(folder),
    "sd-v-latent": lambda folder: save_sd(folder, prediction_type="v_prediction", latent=True),
    "pixart": save_pixart,
    "sd3-flow": save_sd3,
    "sdxl": save_sdxl,
    "flux-dev": save_flux,  # teacher_guidance goes into the guidance embedding
    "zimage": save_zimage,
}
PROMPTS = ["a red cat", "two dogs", "blue sky"]


def brightness(images, prompts):
    """A differentiable toy reward on decoded images in [0, 1]."""
    return images.mean(dim=(1, 2, 3))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.fixture(scope="module", params=list(BUILDERS))
def teacher(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](folder)
    return load_denoiser(folder).frozen()


@pytest.mark.parametrize("method", ["di", "dipp", "dmd2", "didr-tweedie", "didr-k-step-checkpointed", "reward_only"])
def test_one_alignment_run_through_the_backbone(teacher, method):
    generator, fake = OneStepGenerator.from_teacher(teacher, t_star=0.9), teacher.trainable_copy()
    objective = {
        "di": lambda: DI(teacher, fake, teacher_guidance=2.0),
        "dipp": lambda: DIPlusPlus(teacher, fake, brightness, alpha_rew=1.0, teacher_guidance=2.0),
        "dmd2": lambda: DMD2(teacher, fake, teacher_guidance=2.0, reward=brightness, reward_weight=1.0),
        "didr-tweedie": lambda: DIDR(teacher, fake, brightness, beta=0.5, teacher_guidance=2.0),
        "didr-k-step-checkpointed": lambda: DIDR(
            teacher, fake, brightness, beta=0.5, drs="k-step", drs_steps=2, checkpoint=True
        ),
        "reward_only": lambda: RewardOnly(teacher, brightness),
    }[method]()
    before_teacher, before_generator, before_fake = snapshot(teacher), snapshot(generator), snapshot(fake)
    result = align(
        generator, objective, teacher.encode_prompts(PROMPTS), steps=2, batch_size=2, fake=fake,
        fake_loss=FakeScoreLoss(fake), fake_updates=1, lr=1e-3,
    )  # fmt: skip
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert changed(before_generator, generator)
    assert changed(before_fake, fake)
    assert not changed(before_teacher, teacher)
    if method.startswith("didr"):
        assert result.history[-1]["drs_norm"] > 0


def test_lora_alignment_trains_only_the_adapters(teacher):
    generator = OneStepGenerator.from_teacher(teacher, t_star=0.9)
    trainable = add_lora(generator.body, rank=2)
    names = {n for n, p in generator.named_parameters() if p.requires_grad}
    assert trainable > 0 and all("lora_" in n for n in names)
    fake = teacher.trainable_copy()
    before = snapshot(generator)
    result = align(
        generator, DIDR(teacher, fake, brightness, beta=0.5), teacher.encode_prompts(PROMPTS), steps=2,
        batch_size=2, fake=fake, fake_loss=FakeScoreLoss(fake), lr=1e-2,
    )  # fmt: skip
    moved = {k for k, v in generator.state_dict().items() if not torch.equal(before[k], v)}
    assert moved and all("lora_" in k for k in moved)
    frozen = {n: p for n, p in generator.named_parameters() if not p.requires_grad}
    ema = dict(result.ema.named_parameters())
    assert all(ema[n] is p for n, p in frozen.items())  # the EMA copies the adapters only, not the frozen base
    assert all(ema[n] is not p for n, p in generator.named_parameters() if p.requires_grad)
