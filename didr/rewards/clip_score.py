"""CLIP score (Hessel et al. 2021, as torchmetrics' CLIPScore): r(x, p) = max(100 cos(e_I(x), e_T(p)), 0).

The default tower is torchmetrics' default, OpenAI's CLIP ViT-L/14. At the clamp the gradient is that of
`clamp(min=0)`: 100 d cos / dx where 100 cos >= 0, and exactly zero where the cosine is negative, so an image
pointing away from its prompt gets no gradient from this reward (cosines of real image-caption pairs are about 0.2-0.35,
far from the clamp). torchmetrics 1.9 itself does not run on transformers 5 (its get_image_features returns an output
object) and cuts over-long prompts after tokenizing, dropping the end token; here they are truncated keeping it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from didr.rewards.clip_model import CLIPEmbedder, load_clip

REPO = "openai/clip-vit-large-patch14"
REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"


class CLIPScore(nn.Module):
    """r(x, p) = max(100 cos(e_I(x), e_T(p)), 0), [B]."""

    def __init__(self, clip: CLIPEmbedder):
        super().__init__()
        self.clip = clip

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return (100 * self.clip.cosine(images, prompts)).clamp(min=0)


def load_clip_score(weights: str | Path = REPO, revision: str | None = REVISION) -> CLIPScore:
    """CLIP score with the CLIPModel (and its tokenizer) of a local folder or hub repo at `revision`."""
    return CLIPScore(load_clip(weights, revision))
