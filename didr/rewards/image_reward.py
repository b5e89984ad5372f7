"""ImageReward (Xu et al. 2023) through the image-reward package, run on transformers 5.

r(x, p) = (MLP(BERT(p | cross-attending to ViT(x))[CLS]) - 0.16717) / 1.03334, the package's differentiable
`ImageReward.score_gard`, on images preprocessed as `ImageReward.score` does (shortest side to 224 bicubic, center
crop, CLIP normalisation), but on tensors; prompts are tokenized as in `score` (BERT, padded to 35 tokens).

Compatibility shim (image-reward 1.5 targets transformers 4; zai-org/ImageReward issue 122), applied by `_package`:
- BLIP's med.py imports `apply_chunking_to_forward`, `prune_linear_layer` and `find_pruneable_heads_and_indices` from
  transformers.modeling_utils. transformers 5 moved the first two to transformers.pytorch_utils (they are put back)
  and removed the third (a stand-in raises: only head pruning, never used here, calls it).
- transformers 5's PreTrainedModel lost `invert_attention_mask` and `get_head_mask`, which med.BertModel.forward
  calls; their transformers 4 definitions (without head masks, which ImageReward never passes) are added to it.
- med.BertModel.__init__ ends with `init_weights()`, which in transformers 5 ties weights through the
  `all_tied_weights_keys` that only `post_init()` sets; BLIP's text encoder ties nothing, so it is set to {}.
- BLIP's `init_tokenizer` downloads bert-base-uncased and reads the removed `additional_special_tokens_ids`. While the
  model is built it is replaced by one that loads BERT's tokenizer from a local folder or a pinned hub revision and
  adds the same [DEC] (bos) and [ENC] tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from didr.backbones.hub import resolve_folder
from didr.rewards.preprocess import clip_pixels

REPO = "zai-org/ImageReward"
REVISION = "5736be03b2652728fb87788c9797b0570450ab72"
TOKENIZER = "google-bert/bert-base-uncased"
TOKENIZER_REVISION = "86b5e0934494bd15c9632b12f734a8a67f723594"
FILES = ("ImageReward.pt", "med_config.json")
PROMPT_TOKENS = 35
SCORED = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")


@dataclass(frozen=True)
class VisionGeometry:
    """A BLIP ViT's shape. ImageReward's own, the package's `create_vit('large', 224)`, is image_size 224, patch_size
    16, width 1024, depth 24, heads 16."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int


def _no_head_pruning(*args, **kwargs):
    raise NotImplementedError("attention head pruning is not supported by didr's ImageReward shim")


def _invert_attention_mask(self, mask: Tensor) -> Tensor:
    """1 (attend) -> 0, 0 (masked) -> the dtype's minimum, broadcast over heads (and queries for a 2-D mask)."""
    mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    return (1.0 - mask.to(self.dtype)) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask: Tensor | None, num_hidden_layers: int) -> list[None]:
    if head_mask is not None:
        raise NotImplementedError("head masks are not supported by didr's ImageReward shim")
    return [None] * num_hidden_layers


def _package():
    """The ImageReward package, imported after restoring what its BLIP code needs from transformers 4."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        modeling_utils.find_pruneable_heads_and_indices = _no_head_pruning
    import ImageReward
    from ImageReward.models.BLIP import med

    for name, method in (("invert_attention_mask", _invert_attention_mask), ("get_head_mask", _get_head_mask)):
        if not hasattr(med.BertModel, name):
            setattr(med.BertModel, name, method)
    if not hasattr(med.BertModel, "all_tied_weights_keys"):
        med.BertModel.all_tied_weights_keys = {}
    return ImageReward


@contextlib.contextmanager
def _construction(tokenizer_folder: Path, vision: VisionGeometry | None) -> Iterator[None]:
    """BLIP_Pretrain's tokenizer from `tokenizer_folder` (and its ViT of shape `vision`, if given) while building."""
    from ImageReward.models.BLIP import blip_pretrain, vit
    from transformers import BertTokenizer

    def init_tokenizer():
        tokenizer = BertTokenizer.from_pretrained(tokenizer_folder)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
        return tokenizer

    def create_vit(*args, **kwargs):
        encoder = vit.VisionTransformer(
            img_size=vision.image_size,
            patch_size=vision.patch_size,
            embed_dim=vision.width,
            depth=vision.depth,
            num_heads=vision.heads,
        )
        return encoder, vision.width

    saved = blip_pretrain.init_tokenizer, blip_pretrain.create_vit
    blip_pretrain.init_tokenizer = init_tokenizer
    if vision is not None:
        blip_pretrain.create_vit = create_vit
    try:
        yield
    finally:
        blip_pretrain.init_tokenizer, blip_pretrain.create_vit = saved


class ImageRewardScore(nn.Module):
    """r(x, p) = ImageReward.score_gard(BERT tokens of p, clip_pixels(x)), frozen, [B]."""

    model: Any  # ImageReward.ImageReward: the package is untyped
    size: int

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size = self.model.blip.visual_encoder.patch_embed.img_size[0]

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        text = self.model.blip.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS, return_tensors="pt"
        ).to(images.device)
        self.model.device = images.device  # score_gard puts its image attention mask on model.device
        pixels = clip_pixels(images, self.size).to(self.model.mlp.layers[0].weight.dtype)
        return self.model.score_gard(text.input_ids, text.attention_mask, pixels)[:, 0]


def load_image_reward(
    weights: str | Path = REPO,
    revision: str | None = REVISION,
    tokenizer: str | Path = TOKENIZER,
    tokenizer_revision: str | None = TOKENIZER_REVISION,
    vision: VisionGeometry | None = None,
) -> ImageRewardScore:
    """ImageReward from a folder (or hub repo at `revision`) holding ImageReward.pt and med_config.json, with BERT's
    tokenizer from `tokenizer`; `vision` overrides the ViT's shape (default: the package's ViT-L/16)."""
    folder = resolve_folder(weights, revision, FILES)
    tokenizer_folder = resolve_folder(tokenizer, tokenizer_revision, ["*.json", "*.txt"])
    package = _package()
    with _construction(tokenizer_folder, vision):
        model = package.ImageReward(med_config=str(folder / FILES[1]), device="cpu")
    state = torch.load(folder / FILES[0], map_location="cpu", weights_only=True)
    # As ImageReward.load: strict=False (BLIP's unused projection heads may be absent), but every scoring weight.
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(SCORED) and not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{folder / FILES[0]} lacks ImageReward weights, e.g. {missing[:3]}")
    return ImageRewardScore(model)
