"""Backbone adapters over tiny random diffusers pipelines: loading, conversions, CFG, copies, LoRA, precision."""

from __future__ import annotations

import copy as copying
import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from tiny_models import QWEN_WINDOW, save_flux, save_pixart, save_sd, save_sd3, save_sdxl, save_zimage

from didr.backbones.adapter import DiffusersDenoiser
from didr.backbones.base import Conditioning
from didr.backbones.flow import SD3FlowDenoiser
from didr.backbones.flux import FluxDenoiser
from didr.backbones.hub import ModelUnavailableError
from didr.backbones.loading import denoiser_from_components, load_denoiser
from didr.backbones.pixart import PixArtDenoiser
from didr.backbones.tuning import add_lora, enable_gradient_checkpointing
from didr.backbones.unet import UNetDenoiser
from didr.backbones.zimage import ZImageDenoiser
from didr.generator import OneStepGenerator

BUILDERS = {
    "sd_eps_pixel": lambda folder: save_sd(folder),
    "sd_v_latent": lambda folder: save_sd(folder, prediction_type="v_prediction", latent=True),
    "pixart": save_pixart,
    "sd3": save_sd3,
    "sdxl": save_sdxl,
    "flux_dev": save_flux,
    "zimage": save_zimage,
}
ADAPTER = {
    "sd_eps_pixel": UNetDenoiser,
    "sd_v_latent": UNetDenoiser,
    "pixart": PixArtDenoiser,
    "sd3": SD3FlowDenoiser,
    "sdxl": UNetDenoiser,
    "flux_dev": FluxDenoiser,
    "zimage": ZImageDenoiser,
}
PROMPTS = ["a red cat", "two dogs"]


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request, tmp_path_factory) -> tuple[str, object, Path]:
    """(name, in-memory pipeline, saved folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, BUILDERS[request.param](folder), folder


def teacher_of(family) -> DiffusersDenoiser:
    return load_denoiser(family[2]).frozen()


def in_memory(pipe) -> DiffusersDenoiser:
    """The adapter over a pipeline's own components and config."""
    return denoiser_from_components(type(pipe).__name__, pipe.components, config=pipe.config)


def inputs(denoiser: DiffusersDenoiser, seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *denoiser.sample_shape, generator=g), 0.1 + 0.8 * torch.rand(batch, generator=g)


def text_encoders(denoiser: DiffusersDenoiser) -> list[torch.nn.Module]:
    return denoiser.frozen_parts.text.modules


def test_round_trip_matches_in_memory(family):
    name, pipe, folder = family
    loaded = load_denoiser(folder)
    memory = in_memory(pipe)
    assert type(loaded) is ADAPTER[name] and loaded.sample_shape == memory.sample_shape
    parts = [loaded.net, *loaded.frozen_parts.modules], [memory.net, *memory.frozen_parts.modules]
    for a, b in zip(*parts, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    cond = memory.encode_prompts(PROMPTS)
    for key, value in loaded.encode_prompts(PROMPTS).embeds.items():
        torch.testing.assert_close(value, cond.embeds[key])
    x, t = inputs(loaded)
    for w in (1.0, 3.0):
        assert torch.equal(loaded.x0(x, t, cond, w), memory.x0(x, t, cond, w))


def test_prompt_embeds_match_pipeline(family):
    name, pipe, _ = family
    teacher = in_memory(pipe)
    cond = teacher.encode_prompts(PROMPTS)
    if name == "zimage":  # the pipeline's captions: per prompt, the hidden states of its real tokens
        positive, negative = pipe.encode_prompt(list(PROMPTS), "cpu", True, max_sequence_length=QWEN_WINDOW)
        for ours, theirs in ((cond.embeds, positive), (cond.negative, negative)):
            captions = [h[m.bool()] for h, m in zip(ours["hidden"], ours["mask"], strict=True)]
            for caption, expected in zip(captions, theirs, strict=True):
                torch.testing.assert_close(caption, expected)
        assert len(positive[0]) != len(positive[1])  # variable-length captions
        return
    if name == "pixart":
        hidden, mask, neg_hidden, neg_mask = pipe.encode_prompt(
            PROMPTS, negative_prompt="", clean_caption=False, max_sequence_length=16, device="cpu"
        )
        expected = {"hidden": hidden, "mask": mask}, {"hidden": neg_hidden, "mask": neg_mask}
    elif name == "sd3":
        hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", max_sequence_length=16
        )
        expected = {"hidden": hidden, "pooled": pooled}, {"hidden": neg_hidden, "pooled": neg_pooled}
    elif name == "sdxl":  # force_zeros_for_empty_prompt (True): the negative is zeros
        hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
        expected = {"hidden": hidden, "pooled": pooled}, {"hidden": neg_hidden, "pooled": neg_pooled}
    elif name == "flux_dev":  # FluxPipeline encodes a negative only for true CFG, from negative_prompt
        hidden, pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=16)
        neg_hidden, neg_pooled, _ = pipe.encode_prompt(["", ""], None, device="cpu", max_sequence_length=16)
        expected = {"hidden": hidden, "pooled": pooled}, {"hidden": neg_hidden, "pooled": neg_pooled}
    else:
        hidden, neg_hidden = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        expected = {"hidden": hidden}, {"hidden": neg_hidden}
    for ours, theirs in zip((cond.embeds, cond.negative), expected, strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key].to(ours[key].dtype))


@pytest.mark.parametrize("family", ["sd_eps_pixel", "sd_v_latent", "pixart"], indirect=True)
@pytest.mark.parametrize("k", [20, 500, 980])
def test_vp_x0_matches_ddim(family, k):
    name, pipe, _ = family
    teacher = denoiser_from_components(type(pipe).__name__, pipe.components).frozen()
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    cond = teacher.encode_prompts(PROMPTS)
    x, _ = inputs(teacher, seed=k)
    steps = torch.full((2,), k)
    with torch.no_grad():
        if name == "pixart":
            out = pipe.transformer(
                x,
                encoder_hidden_states=cond.embeds["hidden"],
                encoder_attention_mask=cond.embeds["mask"],
                timestep=steps,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample.chunk(2, dim=1)[0]
        else:
            out = pipe.unet(x, steps, encoder_hidden_states=cond.embeds["hidden"]).sample
        ref = scheduler.step(out, k, x)
        t = torch.full((2,), k / 999)
        x0 = teacher.x0(x, t, cond)
        prev = teacher.schedule.step(x, x0, t, torch.full((2,), (k - 100) / 999))
    torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prev, ref.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("i", [0, 2])
def test_flow_x0_matches_flow_match_euler(tmp_path, i):
    pipe = save_sd3(tmp_path)
    teacher = denoiser_from_components(type(pipe).__name__, pipe.components).frozen()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    sigma, sigma_next, timestep = scheduler.sigmas[i], scheduler.sigmas[i + 1], scheduler.timesteps[i]
    cond = teacher.encode_prompts(PROMPTS)
    x, _ = inputs(teacher, seed=i)
    with torch.no_grad():
        v = pipe.transformer(
            x,
            encoder_hidden_states=cond.embeds["hidden"],
            pooled_projections=cond.embeds["pooled"],
            timestep=timestep.expand(2),
        ).sample
        prev = scheduler.step(v, timestep, x).prev_sample
        t = sigma.expand(2)
        x0 = teacher.x0(x, t, cond)
        ours_prev = teacher.schedule.step(x, x0, t, sigma_next.expand(2))
    torch.testing.assert_close(prev, x + (sigma_next - sigma) * v)
    torch.testing.assert_close(x0, x - sigma * v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_prev, prev, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("i", [0, 4, 8])
def test_sdxl_x0_matches_euler(tmp_path, i):
    """SDXL base's own scheduler (Euler, VE latents x_t / a) and added conditioning; CFG 3 against zeros."""
    pipe = save_sdxl(tmp_path)
    teacher = in_memory(pipe).frozen()
    scheduler = pipe.scheduler
    scheduler.set_timesteps(10)
    timestep, sigma, sigma_next = scheduler.timesteps[i], scheduler.sigmas[i], scheduler.sigmas[i + 1]
    hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), hidden.dtype, text_encoder_projection_dim=32)
    torch.testing.assert_close(teacher.time_ids(torch.zeros(1, 4, 8, 8)), time_ids, rtol=0, atol=0)
    x, _ = inputs(teacher, seed=i)
    sample = x * (sigma**2 + 1).sqrt()  # the same point in Euler's units
    with torch.no_grad():
        model_input = scheduler.scale_model_input(torch.cat([sample, sample]), timestep)
        eps_u, eps_c = pipe.unet(
            model_input,
            timestep,
            encoder_hidden_states=torch.cat([neg_hidden, hidden]),
            added_cond_kwargs={"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": time_ids.repeat(4, 1)},
        ).sample.chunk(2)
        ref = scheduler.step(eps_u + 3.0 * (eps_c - eps_u), timestep, sample)
        t = torch.full((2,), float(timestep) / 999)
        x0 = teacher.x0(x, t, teacher.encode_prompts(PROMPTS), 3.0)
        prev = teacher.schedule.step(x, x0, t, torch.full((2,), float(scheduler.timesteps[i + 1]) / 999))
    torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prev, ref.prev_sample / (sigma_next**2 + 1).sqrt(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_negative_follows_force_zeros(tmp_path, force_zeros):
    pipe = save_sdxl(tmp_path)
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    pipe.save_pretrained(tmp_path)
    _, neg_hidden, _, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    assert (neg_hidden.abs().sum() == 0) == force_zeros
    for teacher in (in_memory(pipe), load_denoiser(tmp_path)):
        negative = teacher.encode_prompts(PROMPTS).negative
        torch.testing.assert_close(negative["hidden"], neg_hidden)
        torch.testing.assert_close(negative["pooled"], neg_pooled)


def test_sdxl_added_embedding_width_is_checked(tmp_path):
    pipe = save_sdxl(tmp_path)
    unet = UNet2DConditionModel.from_config(pipe.unet.config, projection_class_embeddings_input_dim=96)
    with pytest.raises(ValueError, match=r"96 features.*addition_time_embed_dim 8 \+ pooled 32 give 80"):
        denoiser_from_components(type(pipe).__name__, {**pipe.components, "unet": unet})


def capture_first_step(store: list):
    """A callback_on_step_end keeping the latents after the pipeline's first scheduler step."""

    def callback(pipe, i, t, kwargs):
        if i == 0:
            store.append(kwargs["latents"].clone())
        return {}

    return callback


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_flux_matches_pipeline_steps(tmp_path, guidance_embeds):
    """Two steps of FluxPipeline itself (packing, ids, timestep / 1000, dynamic shift, guidance) against ours:
    after step 1, prev = x + (s2 - s1) v; the last step (to sigma 0) returns x0 = x - s2 v."""
    pipe = save_flux(tmp_path, guidance_embeds=guidance_embeds)
    pipe.set_progress_bar_config(disable=True)
    teacher = in_memory(pipe).frozen()
    x, _ = inputs(teacher)
    first: list[torch.Tensor] = []
    # dev: the guidance embedding; schnell: true CFG against the empty prompt
    extra = {"guidance_scale": 2.5} if guidance_embeds else {"true_cfg_scale": 2.5, "negative_prompt": ""}
    with torch.no_grad():
        out = pipe(
            PROMPTS, height=16, width=16, num_inference_steps=2, sigmas=[0.9, 0.5], max_sequence_length=16,
            latents=pipe._pack_latents(x, 2, 4, 8, 8), output_type="latent",
            callback_on_step_end=capture_first_step(first), **extra,
        ).images  # fmt: skip
        s1, s2, s3 = pipe.scheduler.sigmas
        cond = teacher.encode_prompts(PROMPTS)
        x0 = teacher.x0(x, s1.expand(2), cond, 2.5)
        x1 = teacher.schedule.step(x, x0, s1.expand(2), s2.expand(2))
        x0_last = teacher.x0(x1, s2.expand(2), cond, 2.5)
    assert s3 == 0 and 0.5 < s2 < s1 < 1 and s2 != 0.5  # shifted by the sequence length
    torch.testing.assert_close(x1, pipe._unpack_latents(first[0], 16, 16, 2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_last, pipe._unpack_latents(out, 16, 16, 2), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(x0_last, teacher.x0(x1, s2.expand(2), cond, 1.0))


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_zimage_matches_pipeline_steps(tmp_path, w):
    """Two steps of ZImagePipeline itself (list inputs, tau = (1000 - timestep) / 1000, u = -v, its CFG
    pos + w (pos - neg) = our guidance 1 + w) against ours: prev = x + (s2 - s1) v, then x0 = x - s2 v."""
    pipe = save_zimage(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    teacher = in_memory(pipe).frozen()
    x, _ = inputs(teacher)
    first: list[torch.Tensor] = []
    with torch.no_grad():
        out = pipe(
            list(PROMPTS), height=16, width=16, num_inference_steps=2, sigmas=[0.9, 0.5], guidance_scale=w,
            latents=x, output_type="latent", max_sequence_length=QWEN_WINDOW,
            callback_on_step_end=capture_first_step(first),
        ).images  # fmt: skip
        s1, s2, _ = pipe.scheduler.sigmas
        cond = teacher.encode_prompts(PROMPTS)
        x0 = teacher.x0(x, s1.expand(2), cond, 1.0 + w)
        x1 = teacher.schedule.step(x, x0, s1.expand(2), s2.expand(2))
        x0_last = teacher.x0(x1, s2.expand(2), cond, 1.0 + w)
    torch.testing.assert_close(x1, first[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_last, out, rtol=1e-4, atol=1e-4)


def test_cfg_is_affine_in_x0(family):
    teacher = teacher_of(family)
    cond = teacher.encode_prompts(PROMPTS)
    x, t = inputs(teacher)
    if family[0] == "flux_dev":
        # guidance-distilled: w is an input of one conditional pass (FluxDenoiser), not a mix of two branches
        with torch.no_grad():
            plain = teacher.predict_x0(x, t, cond.embeds)
            guided = teacher.x0(x, t, cond, guidance=4.0)
            without_negative = teacher.x0(x, t, Conditioning(cond.prompts, cond.embeds), guidance=4.0)
            torch.testing.assert_close(teacher.x0(x, t, cond), plain, rtol=0, atol=0)
        torch.testing.assert_close(guided, without_negative, rtol=0, atol=0)
        assert not torch.allclose(guided, plain)
        return
    with torch.no_grad():
        x0_u = teacher.predict_x0(x, t, cond.negative)
        x0_c = teacher.predict_x0(x, t, cond.embeds)
        guided = teacher.x0(x, t, cond, guidance=4.0)
    assert not torch.allclose(x0_u, x0_c)
    torch.testing.assert_close(guided, x0_u + 4.0 * (x0_c - x0_u), rtol=1e-4, atol=1e-4)


def test_trainable_copy_shares_frozen_parts(family):
    teacher = teacher_of(family)
    copy = teacher.trainable_copy()
    assert {id(p) for p in copy.parameters()} == {id(p) for p in copy.net.parameters()}
    assert not {id(p) for p in copy.parameters()} & {id(p) for p in teacher.parameters()}
    for ours, theirs in zip(text_encoders(copy), text_encoders(teacher), strict=True):
        assert ours is theirs
    assert copy.frozen_parts.vae is teacher.frozen_parts.vae
    frozen = {id(p) for m in teacher.frozen_parts.modules for p in m.parameters()}
    assert not frozen & {id(p) for p in copy.parameters()}
    assert all(k.startswith("net.") for k in copy.state_dict())
    x, t = inputs(copy)
    copy.x0(x, t, copy.encode_prompts(PROMPTS), guidance=2.0).square().mean().backward()
    grads = [p.grad for p in copy.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for m in teacher.frozen_parts.modules for p in m.parameters())


def test_make_generator_starts_at_teacher_x0(family):
    teacher = teacher_of(family)
    generator = OneStepGenerator.from_teacher(teacher, t_star=0.9)
    cond = teacher.encode_prompts(PROMPTS)
    z, _ = inputs(teacher)
    out = generator(z, cond)
    assert out.shape == (2, *teacher.sample_shape) == (2, *generator.sample_shape)
    with torch.no_grad():
        torch.testing.assert_close(out, teacher.x0(z, torch.full((2,), 0.9), cond), rtol=0, atol=0)
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    ema = copying.deepcopy(generator)  # what the alignment loop keeps as the generator's EMA
    assert ema.body.frozen_parts is generator.body.frozen_parts is teacher.frozen_parts
    assert not {id(p) for p in ema.parameters()} & {id(p) for p in generator.parameters()}


def test_lora_trains_only_adapters(family):
    teacher = teacher_of(family)
    student = teacher.trainable_copy()
    count = add_lora(student, rank=2)
    named = dict(student.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert count == sum(p.numel() for p in trainable.values())
    assert 0 < count < 0.1 * sum(p.numel() for n, p in named.items() if "lora_" not in n)
    cond = teacher.encode_prompts(PROMPTS)
    x, t = inputs(teacher)
    with torch.no_grad():
        before = teacher.x0(x, t, cond)
    assert torch.equal(student.x0(x, t, cond), before)
    optimiser = torch.optim.SGD(trainable.values(), lr=1.0)
    student.x0(x, t, cond).square().mean().backward()
    optimiser.step()
    with torch.no_grad():
        assert not torch.allclose(student.x0(x, t, cond), before)
        assert torch.equal(teacher.x0(x, t, cond), before)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    for sub in module.modules():
        sub.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_same_gradients(family):
    teacher = teacher_of(family)
    plain, checkpointed = teacher.trainable_copy(), teacher.trainable_copy()
    enable_gradient_checkpointing(checkpointed)
    cond = teacher.encode_prompts(PROMPTS)
    x, t = inputs(teacher)
    grads, calls = [], []
    for model in (plain, checkpointed):
        counter = count_calls(model.net)
        model.x0(x, t, cond).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
        calls.append(counter[0])
    assert calls[1] > calls[0], "checkpointing should re-run block forwards in the backward pass"
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_autocast(family):
    fp32, bf16 = load_denoiser(family[2]).frozen(), load_denoiser(family[2], precision="bf16").frozen()
    cond = fp32.encode_prompts(PROMPTS)
    x, t = inputs(fp32)
    t = torch.full_like(t, 0.5)
    with torch.no_grad():
        ref, out = fp32.x0(x, t, cond), bf16.x0(x, t, cond)
        image = bf16.decode(out)
    assert out.dtype == torch.float32 and image.dtype == torch.float32
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 5e-2
    assert next(bf16.parameters()).dtype == torch.float32


def test_to_moves_frozen_parts(family):
    teacher = teacher_of(family).to(torch.float64)
    assert all(p.dtype == torch.float64 for m in teacher.frozen_parts.modules for p in m.parameters())
    cond = teacher.encode_prompts(PROMPTS)
    x, t = inputs(teacher)
    assert teacher.x0(x.double(), t.double(), cond, 2.0).dtype == torch.float64


def test_decode(tmp_path):
    save_sd(tmp_path / "sd")
    pixel = load_denoiser(tmp_path / "sd")
    x0 = torch.rand(2, *pixel.sample_shape) * 2 - 1
    torch.testing.assert_close(pixel.decode(x0), (x0 + 1) / 2)
    for name, save in {"sd3": save_sd3, "flux": save_flux, "zimage": save_zimage}.items():
        pipe = save(tmp_path / name)
        latent = load_denoiser(tmp_path / name)
        z = torch.randn(2, *latent.sample_shape)
        with torch.no_grad():  # the pipelines' decoding: latents / scaling_factor + shift_factor
            expected = pipe.vae.decode(z / 1.5 + 0.1).sample
            torch.testing.assert_close(latent.decode(z), (expected + 1) / 2)
        assert latent.decode(z).shape == (2, 3, 16, 16)


def test_pixart_additional_conditions(tmp_path):
    pipe = save_pixart(tmp_path)
    torch.manual_seed(0)
    # PixArt-alpha 1024's size embedding splits the width in three: 2 heads x 12 = 24
    net = PixArtTransformer2DModel.from_config(
        pipe.transformer.config, use_additional_conditions=True, attention_head_dim=12, cross_attention_dim=24
    )
    components = {**pipe.components, "transformer": net}
    teacher = denoiser_from_components("PixArtAlphaPipeline", components)
    assert teacher.net.use_additional_conditions
    kwargs = teacher.added_cond_kwargs(torch.zeros(3, *teacher.sample_shape))
    assert kwargs["resolution"].tolist() == [[16.0, 16.0]] * 3 and kwargs["aspect_ratio"].tolist() == [[1.0]] * 3
    x, t = inputs(teacher)
    assert teacher.x0(x, t, teacher.encode_prompts(PROMPTS), 2.0).isfinite().all()


def test_pixart_conditions_on_prompts_as_its_pipeline_does(tmp_path):
    """PixArtAlphaPipeline lower-cases and strips every prompt (clean_caption=False): so does the adapter, and its
    embeddings equal the pipeline's own encode_prompt."""
    pipe = save_pixart(tmp_path)
    teacher = load_denoiser(tmp_path)
    ours = teacher.encode_prompts(["  Red Circle ", "red circle"]).embeds["hidden"]
    torch.testing.assert_close(ours[0], ours[1])
    window = ours.shape[1]  # the tiny tokenizer's, below PixArt-alpha's 120
    pipe.text_encoder.eval()  # built from a config in training mode (T5's dropout), as a loaded pipeline is not
    with torch.no_grad():
        theirs, *_ = pipe.encode_prompt("  Red Circle ", False, clean_caption=False, max_sequence_length=window)
    torch.testing.assert_close(ours[:1], theirs, rtol=1e-6, atol=1e-6)


def test_hub_id_offline_raises_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelUnavailableError) as info:
        load_denoiser("some-org/some-model", revision="0123abc")
    message = str(info.value)
    assert "some-org/some-model" in message and "0123abc" in message and "\n" not in message
    assert "offline" in message and "cache" in message


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match=r"some-org/some-model.*revision"):
        load_denoiser("some-org/some-model")
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_denoiser(missing)
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "HunyuanDiTPipeline", "transformer": ["diffusers", "HunyuanDiT2DModel"]})
    )
    with pytest.raises(ValueError, match=r"model_index.json.*HunyuanDiT2DModel"):
        load_denoiser(tmp_path)


def test_prompts_long_and_empty(tmp_path):
    save_sd(tmp_path)
    teacher = load_denoiser(tmp_path)
    long = "a cat " * 20
    with pytest.warns(UserWarning, match="truncated") as record:
        cond = teacher.encode_prompts(["a cat", long])
    message = str(record[0].message)
    assert repr(long[:60]) in message and repr(long[:61]) not in message
    assert cond.embeds["hidden"].shape[:2] == (2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher.encode_prompts(["a cat"])
    with pytest.raises(ValueError, match="empty"):
        teacher.encode_prompts([])
