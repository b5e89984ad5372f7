"""HPSv2 (Wu et al. 2023), v2.0 or v2.1, through the OpenCLIP copy bundled with the hpsv2 package.

HPS(x, p) = <f_I(x) / |f_I(x)|, f_T(p) / |f_T(p)|>: the diagonal of `hpsv2.score`'s image_features @ text_features.T
(a cosine, about 0.2-0.3 on real images; no logit scale). hpsv2 preprocesses with ToTensor, then ResizeMaxSize
(longest side to 224, bicubic, black padding) and CLIP's normalisation; here the same steps run on tensors, so the
score is differentiable in the images (hpsv2.score runs under no_grad on PIL images).

The 1.2.0 wheel lacks the BPE vocabulary its tokenizer loads at import: `install_vocabulary` (run by `make setup`)
copies openai-clip's byte-identical `bpe_simple_vocab_16e6.txt.gz` next to it. Its open_clip also imports turtle (a
stray `from turtle import forward`), so Python must be built with tkinter.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from didr.backbones.hub import resolve_file
from didr.rewards.preprocess import normalize, resize_longest_pad

REPO = "xswu/HPSv2"
REVISION = "697403c78157020a1ae59d23f111aa58ced35b0a"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ARCHITECTURE = "ViT-H-14"
VOCABULARY = "bpe_simple_vocab_16e6.txt.gz"


def _package_folder(name: str) -> Path:
    """The folder of installed package `name`, found without importing it."""
    spec = find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is not installed (make setup installs it)"
    return Path(spec.origin).parent


def install_vocabulary() -> Path:
    """Copy openai-clip's BPE vocabulary into hpsv2's open_clip folder (once); its path there."""
    target = _package_folder("hpsv2") / "src" / "open_clip" / VOCABULARY
    if not target.is_file():
        shutil.copyfile(_package_folder("clip") / VOCABULARY, target)
    return target


def _open_clip():
    """hpsv2's bundled open_clip; a clear error when its tokenizer vocabulary is missing."""
    try:
        from hpsv2.src import open_clip
    except FileNotFoundError as err:
        raise ImportError(
            f"hpsv2's open_clip cannot load its BPE vocabulary {err.filename}; install it with "
            "`python -c 'from didr.rewards.hps import install_vocabulary; install_vocabulary()'` (make setup does)"
        ) from err
    return open_clip


class HPSv2Reward(nn.Module):
    """r(x, p) = cos(f_I(normalise(resize_longest_pad(x))), f_T(tokens(p))), frozen, [B]."""

    model: Any  # hpsv2's open_clip CLIP: the package is untyped
    size: int

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.size = self.model.visual.image_size[0]

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        pixels = normalize(resize_longest_pad(images, self.size))
        tokens = self.tokenizer(list(prompts)).to(images.device)
        out = self.model(pixels.to(self.model.logit_scale.dtype), tokens)
        return (out["image_features"] * out["text_features"]).sum(-1)


def load_hps(
    weights: str | Path = REPO,
    version: str = "v2.1",
    revision: str | None = REVISION,
    architecture: str = ARCHITECTURE,
) -> HPSv2Reward:
    """HPSv2 `version` ('v2.0' or 'v2.1') from a checkpoint file, a folder holding it, or hub repo `weights` at
    `revision`; `architecture` names an open_clip model config (ViT-H-14 for the released checkpoints)."""
    if version not in CHECKPOINTS:
        raise ValueError(f"unknown HPS version {version!r}; known: {sorted(CHECKPOINTS)}")
    path = resolve_file(weights, revision, CHECKPOINTS[version])
    open_clip = _open_clip()
    model = open_clip.create_model(architecture, pretrained=None, precision="fp32", output_dict=True)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    return HPSv2Reward(model, open_clip.get_tokenizer(architecture))
