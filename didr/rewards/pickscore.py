"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

r(x, p) = exp(logit_scale) * cos(e_I(x), e_T(p)), the model card's `model.logit_scale.exp() * text_embs @ image_embs.T`
on the diagonal (about 20-23 on real images). The processor it names (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) resizes
the shortest side to 224 bicubic, center crops and normalises with CLIP's mean and std: `clip_pixels` on tensors.
The model repository has no tokenizer; it comes from the processor's repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from didr.rewards.clip_model import CLIPEmbedder, load_clip

REPO = "yuvalkirstain/PickScore_v1"
REVISION = "a4e4367c6dfa7288a00c550414478f865b875800"
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PROCESSOR_REVISION = "1c2b8495b28150b8a4922ee1c8edee224c284c0c"


class PickScore(nn.Module):
    """r(x, p) = exp(logit_scale) cos(e_I(x), e_T(p)), [B]."""

    def __init__(self, clip: CLIPEmbedder):
        super().__init__()
        self.clip = clip

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.clip.model.logit_scale.exp() * self.clip.cosine(images, prompts)


def load_pickscore(
    weights: str | Path = REPO,
    revision: str | None = REVISION,
    tokenizer: str | Path = PROCESSOR,
    tokenizer_revision: str | None = PROCESSOR_REVISION,
) -> PickScore:
    """PickScore from a CLIPModel folder or hub repo at `revision`, its tokenizer from `tokenizer`."""
    return PickScore(load_clip(weights, revision, tokenizer, tokenizer_revision))
