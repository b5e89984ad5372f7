"""The LAION aesthetic predictor v2 (improved-aesthetic-predictor, sac+logos+ava1-l14-linearMSE): a linear MLP on
unit-norm CLIP ViT-L/14 image embeddings.

r(x) = MLP(e_I(x)), MLP = Linear(768, 1024) -> Linear(1024, 128) -> Linear(128, 64) -> Linear(64, 16) -> Linear(16, 1)
with no activations (its dropouts are off in eval), about 1-10 on real images. The original embeds with openai-clip's
ViT-L/14 (the weights of transformers' openai/clip-vit-large-patch14) after its PIL preprocessing; here `clip_pixels`
on tensors. The MLP's default weights are TRL's copy of the original file (trl-lib/ddpo-aesthetic-predictor).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from didr.backbones.hub import resolve_file
from didr.rewards.clip_model import CLIPEmbedder, load_clip

REPO = "trl-lib/ddpo-aesthetic-predictor"
REVISION = "cf4bd10345610935a80a5d3be9a3133c50f121e4"
FILENAME = "aesthetic-model.pth"
CLIP = "openai/clip-vit-large-patch14"
CLIP_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"


class AestheticMLP(nn.Module):
    """The predictor's MLP, keyed layers.{0,2,4,6,7}.{weight,bias} as the original state dict."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)[:, 0]


class AestheticPredictor(nn.Module):
    """r(x) = MLP(e_I(x)), [B]; prompts are ignored."""

    def __init__(self, clip: CLIPEmbedder, mlp: AestheticMLP):
        super().__init__()
        self.clip = clip
        self.mlp = mlp.eval().requires_grad_(False)

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return self.mlp(self.clip.image(images))


def load_aesthetic(
    weights: str | Path = REPO,
    revision: str | None = REVISION,
    clip: str | Path = CLIP,
    clip_revision: str | None = CLIP_REVISION,
) -> AestheticPredictor:
    """The MLP from a .pth state dict (a file, a folder holding aesthetic-model.pth, or hub repo `weights` at
    `revision`) on the CLIPModel of `clip`; the MLP's input width is read from the file."""
    state = torch.load(resolve_file(weights, revision, FILENAME), map_location="cpu", weights_only=True)
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return AestheticPredictor(load_clip(clip, clip_revision, text=False), mlp)
