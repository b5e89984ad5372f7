"""A frozen transformers CLIPModel giving unit-norm image and text embeddings, shared by PickScore, CLIP score and the
LAION aesthetic predictor.

e_I(x) = P_I(vision(clip_pixels(x)).pooled) / |.|, e_T(p) = P_T(text(tokens(p)).pooled) / |.|; the projections are
applied explicitly because transformers 5's get_image_features / get_text_features return output objects, not
tensors. Prompts are padded to the batch's longest and truncated to the text tower's window, keeping the end token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from didr.backbones.hub import resolve_folder
from didr.rewards.preprocess import clip_pixels

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPTextConfig, CLIPVisionConfig

MODEL_FILES = ["*.json", "*.txt", "*.safetensors"]
TOKENIZER_FILES = ["*.json", "*.txt"]


class CLIPEmbedder(nn.Module):
    """Unit-norm CLIP embeddings of images [B, 3, H, W] in [0, 1] and of prompts, differentiable in the images."""

    model: CLIPModel
    size: int

    def __init__(self, model: CLIPModel, tokenizer=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        # CLIPConfig annotates its sub-configs as the dict / None its constructor takes; __post_init__ makes them
        # configs. A CLIP tower's image_size is an int (square inputs).
        self.size = cast(int, cast("CLIPVisionConfig", model.config.vision_config).image_size)

    def image(self, images: Tensor) -> Tensor:
        pixels = clip_pixels(images, self.size).to(self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def text(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        window = cast("CLIPTextConfig", self.model.config.text_config).max_position_embeddings
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=window, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """cos(e_I(x_b), e_T(p_b)), [B]."""
        return (self.image(images) * self.text(prompts, images.device)).sum(-1)


def load_clip(
    source: str | Path,
    revision: str | None,
    tokenizer: str | Path | None = None,
    tokenizer_revision: str | None = None,
    text: bool = True,
) -> CLIPEmbedder:
    """A CLIPModel folder (or hub repo at `revision`: configs, tokenizer files, safetensors weights), its tokenizer
    from `tokenizer` when the model folder has none (None: the model's own); `text=False` loads no tokenizer."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = resolve_folder(source, revision, MODEL_FILES)
    model = CLIPModel.from_pretrained(folder)
    if not text:
        return CLIPEmbedder(model)
    tokenizer_folder = folder if tokenizer is None else resolve_folder(tokenizer, tokenizer_revision, TOKENIZER_FILES)
    return CLIPEmbedder(model, CLIPTokenizer.from_pretrained(tokenizer_folder))
