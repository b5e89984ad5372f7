"""The real rewards at tiny sizes: each architecture built through the package's own code, random weights saved to
disk and loaded back through the adapter's loader; scores, gradients, tensor preprocessing and scores against the
packages' own (PIL, no-grad) scoring, and the offline error. Needs the `rewards` extra (make setup installs it).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

for _module in ("torchvision", "hpsv2", "ImageReward", "clip", "timm", "fairscale"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(
            f"the rewards extra is not installed ({_module} is missing; make setup installs it)",
            allow_module_level=True,
        )

from PIL import Image, ImageDraw  # noqa: E402
from tiny_models import clip_model_config, clip_tokenizer  # noqa: E402
from transformers import BertTokenizer, CLIPImageProcessor, CLIPModel, CLIPProcessor  # noqa: E402

from didr.backbones.hub import ModelUnavailableError  # noqa: E402
from didr.rewards import aesthetic, clip_score, hps, image_reward, pickscore  # noqa: E402
from didr.rewards.aesthetic import AestheticMLP  # noqa: E402
from didr.rewards.preprocess import clip_pixels, normalize, resize_longest_pad  # noqa: E402
from didr.rewards.registry import build_reward, known_rewards  # noqa: E402

pytestmark = pytest.mark.integration  # the reward packages (hpsv2, ImageReward, open_clip, ...) build their models

SIZE = 32
PROMPTS = ["red cat", "a blue sky"]
# Each registered name and the module of its loader, whose REPO at REVISION is the default weights.
MODULES = {
    "hpsv2": hps,
    "imagereward": image_reward,
    "pickscore": pickscore,
    "laion_aesthetic": aesthetic,
    "clip_score": clip_score,
}
# Pillow resamples uint8 and rounds each pass to a grey level, clip_pixels stays in float: on the 48 x 40 images the
# measured max |difference| of normalised pixels is 0.034 (2.3 grey levels, at sharp noisy edges), the mean 0.0038,
# against openai-clip / BLIP's torchvision-on-PIL transform and both backends of transformers' CLIPImageProcessor.
# hpsv2 resizes a float tensor: equal up to float error.
PIL_TOLERANCE = 0.05
PIL_MEAN_TOLERANCE = 0.006
TENSOR_TOLERANCE = 1e-5


def _random(build, seed: int):
    """build() under a fixed seed, its matrices redrawn from N(0, 1 / fan_in), the scale of a trained net's, so that
    the image matters to the score (some packages initialise with std 0.02 or less)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, p[0].numel() ** -0.5)
    return model


def _draw(folder: Path, width: int, height: int) -> list[Path]:
    """Two RGB PNGs: gradients, shapes and noise."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        y, x = np.mgrid[0:height, 0:width] / width
        base = np.stack([x, y, (x + y) / 2 if i else 1 - x], -1) * 255
        image = Image.fromarray((base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        draw.ellipse(
            (0.2 * width + 4 * i, 0.15 * height, 0.6 * width + 4 * i, 0.7 * height), fill=(220, 40 + 100 * i, 30)
        )
        draw.rectangle((0.55 * width, 0.5 * height, 0.9 * width, 0.9 * height), outline=(10, 10, 120), width=2)
        paths.append(folder / f"{width}x{height}_{i}.png")
        image.save(paths[-1])
    return paths


def _load(files: list[Path]) -> torch.Tensor:
    """PNGs as [B, 3, H, W] in [0, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1) / 255 for p in files])


@pytest.fixture(scope="module")
def wide_files(tmp_path_factory) -> list[Path]:
    """48 x 40 images: resizes, crops and pads differ from the identity."""
    return _draw(tmp_path_factory.mktemp("wide"), 48, 40)


@pytest.fixture(scope="module")
def square_files(tmp_path_factory) -> list[Path]:
    """SIZE x SIZE images: every pipeline's resize is the identity (Pillow's too), so scores can match exactly."""
    return _draw(tmp_path_factory.mktemp("square"), SIZE, SIZE)


def _close_to_pil(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    difference = (ours - theirs).abs()
    return difference.max() < PIL_TOLERANCE and difference.mean() < PIL_MEAN_TOLERANCE


def _check_scores_and_gradients(reward, images: torch.Tensor) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().amax(dim=(1, 2, 3)).min() > 0
    return scores.detach()


# HPSv2


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory) -> Path:
    """A tiny ViT/text-transformer CLIP registered as an open_clip config and saved as HPSv2 checkpoints are."""
    folder = tmp_path_factory.mktemp("hps")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "HPS-tiny.json").write_text(json.dumps(config))
    open_clip = hps._open_clip()
    open_clip.add_model_config(folder / "HPS-tiny.json")
    model = _random(lambda: open_clip.create_model("HPS-tiny", pretrained=None, output_dict=True), 0)
    torch.save({"state_dict": model.state_dict()}, folder / hps.CHECKPOINTS["v2.0"])
    return folder / hps.CHECKPOINTS["v2.0"]


def test_hpsv2(hps_checkpoint, wide_files, monkeypatch):
    """Tensor preprocessing = hpsv2's preprocess_val; scores = hpsv2.img_score.score with the same model and file."""
    from hpsv2 import img_score

    reward = build_reward("hpsv2", folder=None, weights=hps_checkpoint.parent, version="v2.0", architecture="HPS-tiny")
    images = _load(wide_files)
    scores = _check_scores_and_gradients(reward, images)

    open_clip = hps._open_clip()
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        "HPS-tiny", None, precision="amp", light_augmentation=True, output_dict=True
    )
    theirs = torch.stack([preprocess_val(Image.open(p)) for p in wide_files])
    assert (normalize(resize_longest_pad(images, SIZE)) - theirs).abs().max() < TENSOR_TOLERANCE
    # hpsv2.score builds ViT-H-14 with downloaded weights once into img_score.model_dict; seed it with the tiny one.
    monkeypatch.setattr(img_score, "model_dict", {"model": model, "preprocess_val": preprocess_val})
    monkeypatch.setattr(img_score, "root_path", str(hps_checkpoint.parent))
    expected = [
        img_score.score(str(path), prompt, cp=str(hps_checkpoint))[0]
        for path, prompt in zip(wide_files, PROMPTS, strict=True)
    ]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)


# ImageReward

VISION = image_reward.VisionGeometry(image_size=SIZE, patch_size=8, width=32, depth=1, heads=2)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cat", "sky"]


@pytest.fixture(scope="module")
def image_reward_files(tmp_path_factory) -> tuple[Path, Path]:
    """(weights folder with ImageReward.pt + med_config.json, BERT tokenizer folder) of a tiny ImageReward."""
    folder = tmp_path_factory.mktemp("imagereward")
    tokenizer = folder / "tokenizer"
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(tokenizer)
    med_config = {
        "architectures": ["BertModel"],
        "hidden_act": "gelu",
        "hidden_size": 768,  # ImageReward's MLP(768) reads the [CLS] feature
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "max_position_embeddings": 40,
        "vocab_size": len(WORDS) + 2,  # + [DEC], [ENC]
        "encoder_width": VISION.width,
        "add_cross_attention": True,
        "layer_norm_eps": 1e-12,
        "model_type": "bert",
        "pad_token_id": 0,
        "type_vocab_size": 2,
    }
    (folder / "med_config.json").write_text(json.dumps(med_config))
    package = image_reward._package()
    with image_reward._construction(tokenizer, VISION):
        model = _random(lambda: package.ImageReward(med_config=str(folder / "med_config.json"), device="cpu"), 1)
    torch.save(model.state_dict(), folder / "ImageReward.pt")
    return folder, tokenizer


def test_imagereward(image_reward_files, wide_files, square_files):
    """Tensor preprocessing = ImageReward's PIL transform within Pillow's rounding; scores = ImageReward.score."""
    from ImageReward.ImageReward import _transform

    weights, tokenizer = image_reward_files
    reward = build_reward("imagereward", folder=None, weights=weights, tokenizer=tokenizer, vision=VISION)
    scores = _check_scores_and_gradients(reward, _load(square_files))

    model = reward.model
    model.preprocess = _transform(SIZE)  # the package's transform at the tiny ViT's size (224 for the real one)
    theirs = torch.stack([model.preprocess(Image.open(p)) for p in wide_files])
    assert _close_to_pil(clip_pixels(_load(wide_files), SIZE), theirs)
    with torch.no_grad():
        expected = [model.score(prompt, str(path)) for prompt, path in zip(PROMPTS, square_files, strict=True)]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-4)


# CLIP towers: PickScore, CLIP score, LAION aesthetic


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny CLIPModel with its tokenizer and CLIP image processor (shortest side and crop SIZE)."""
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = clip_tokenizer()
    config = clip_model_config(len(tokenizer), SIZE)
    model = _random(lambda: CLIPModel(config), 2)
    model.save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


def _processor_embeddings(folder: Path, files: list[Path]) -> tuple[CLIPModel, torch.Tensor, torch.Tensor]:
    """The model card's processor path (transformers 5: get_*_features return outputs with projected pooler_output):
    (model, unit-norm image embeddings, unit-norm prompt embeddings)."""
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    image_inputs = processor(images=[Image.open(p) for p in files], return_tensors="pt")
    text_inputs = processor(text=PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(**image_inputs).pooler_output
        text = model.get_text_features(**text_inputs).pooler_output
    return model, image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_clip_preprocessing(clip_folder, wide_files, backend):
    """clip_pixels = transformers' CLIPImageProcessor within uint8 rounding, with its torchvision backend
    (transformers 5's default; it resizes uint8 tensors) and its PIL one (transformers 4's)."""
    from transformers import CLIPImageProcessorPil

    kind = CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil
    processor = kind.from_pretrained(clip_folder)
    theirs = processor(images=[Image.open(p) for p in wide_files], return_tensors="pt").pixel_values
    assert _close_to_pil(clip_pixels(_load(wide_files), SIZE), theirs)


def test_pickscore(clip_folder, square_files):
    """PickScore = exp(logit_scale) cos, as the model card computes it from the processor's inputs."""
    reward = build_reward("pickscore", folder=None, weights=clip_folder, tokenizer=clip_folder)
    scores = _check_scores_and_gradients(reward, _load(square_files))
    model, image, text = _processor_embeddings(clip_folder, square_files)
    expected = model.logit_scale.exp() * (image * text).sum(-1)
    assert torch.allclose(scores, expected.detach(), atol=1e-4)


def test_clip_score(clip_folder, square_files):
    """CLIP score = max(100 cos, 0), as torchmetrics computes it from the processor's inputs, with the tower's
    weights and with its text projection negated (every cosine changes sign): the gradient reaches the image where
    the cosine is positive and is exactly 0 where it is negative."""
    reward = build_reward("clip_score", folder=None, weights=clip_folder)
    _, image, text = _processor_embeddings(clip_folder, square_files)
    cosine = (image * text).sum(-1)
    for sign in (1, -1):
        x = _load(square_files).requires_grad_(True)
        scores = reward(x, PROMPTS)
        assert scores.shape == (2,) and torch.allclose(scores.detach(), (100 * sign * cosine).clamp(min=0), atol=1e-3)
        (grad,) = torch.autograd.grad(scores.sum(), x)
        assert torch.isfinite(grad).all()
        assert ((grad.abs().amax(dim=(1, 2, 3)) > 0) == (sign * cosine > 0)).all()
        with torch.no_grad():
            reward.clip.model.text_projection.weight.neg_()


def test_laion_aesthetic(clip_folder, square_files, tmp_path):
    """aesthetic = MLP(unit-norm CLIP image embedding), as TRL's DDPO scorer computes it from the processor."""
    mlp = _random(lambda: AestheticMLP(16), 3)
    torch.save(mlp.state_dict(), tmp_path / "aesthetic-model.pth")
    reward = build_reward("laion_aesthetic", folder=None, weights=tmp_path, clip=clip_folder)
    scores = _check_scores_and_gradients(reward, _load(square_files))
    _, image, _ = _processor_embeddings(clip_folder, square_files)
    with torch.no_grad():
        expected = mlp.eval()(image)
    assert torch.allclose(scores, expected, atol=1e-4)


# Registry, offline hub, core imports


@pytest.mark.parametrize("name", sorted(MODULES))
def test_offline_hub_error(name, monkeypatch, tmp_path):
    """The default weights, not cached and HF_HUB_OFFLINE set: one line naming the model, its revision, offline."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailableError) as err:
        build_reward(name, folder=tmp_path)
    module = MODULES[name]
    assert str(err.value) == (
        f"model {module.REPO!r} at revision {module.REVISION!r} is not in the local Hugging Face cache and the hub "
        "is offline (HF_HUB_OFFLINE) (LocalEntryNotFoundError)"
    )


def test_hub_id_needs_revision():
    """A hub id without a revision is refused before any hub call."""
    with pytest.raises(ValueError, match="needs a pinned revision"):
        build_reward("pickscore", weights="someone/some-model", revision=None)


def test_registry_imports_no_reward_package():
    """The core registry lists the real rewards without importing hpsv2, ImageReward, clip or torchvision."""
    assert set(MODULES) <= set(known_rewards())
    code = (
        "import sys, didr.plugins, didr.rewards.registry as r; didr.plugins.load_plugins(); "
        "r.build_reward('toy_aesthetic'); "
        "print(sorted(m for m in ('hpsv2', 'ImageReward', 'clip', 'torchvision') if m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
