"""Frozen prompt encoders: tokenizer + text-encoder towers (CLIP, CLIP with projection, T5) to a backbone's embeds.

Embedding keys: "hidden" [B, L, D] (the cross-attention context), "pooled" [B, P] (concatenated CLIP projections,
or FLUX's CLIP pooler_output, when some tower has one) and "mask" [B, L] (token attention mask, for backbones that
take one).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from didr.backbones.base import Conditioning

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class TextTower:
    """One tokenizer and its text encoder.

    `hidden_layer` None takes last_hidden_state (SD1.5, T5); an int indexes hidden_states (SDXL, SD3 and Z-Image's
    Qwen3 use -2). `max_length` caps the tokenizer's own window (PixArt feeds T5 120 tokens, SD3 256, FLUX and
    Z-Image 512). `pooled_only`: the tower gives only its pooler_output, as "pooled" (FLUX's CLIPTextModel).
    `chat_template`: each prompt is wrapped as one user turn of the tokenizer's chat template (Z-Image).
    """

    tokenizer: Any
    encoder: PreTrainedModel
    hidden_layer: int | None = None
    max_length: int | None = None
    pooled_only: bool = False
    chat_template: bool = False

    @property
    def window(self) -> int:
        own = int(self.tokenizer.model_max_length)
        return own if self.max_length is None else min(own, self.max_length)

    @property
    def is_clip(self) -> bool:
        return self.encoder.config.model_type.startswith("clip")

    def texts(self, prompts: list[str]) -> list[str]:
        """What the tokenizer reads: the prompts, or (chat_template) each as ZImagePipeline._encode_prompt renders it,
        apply_chat_template([user turn], tokenize=False, add_generation_prompt=True, enable_thinking=True)."""
        if not self.chat_template:
            return prompts
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for p in prompts
        ]

    def too_long(self, prompts: list[str]) -> list[str]:
        """The prompts whose tokens (special tokens included) overflow the window."""
        ids = self.tokenizer(self.texts(prompts), truncation=True, max_length=self.window + 1)["input_ids"]
        return [p for p, i in zip(prompts, ids, strict=True) if len(i) > self.window]

    def encode(self, prompts: list[str], use_mask: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """(hidden [B, L, D] or None when pooled_only, pooled [B, P] or None, attention mask [B, L])."""
        tokens = self.tokenizer(
            self.texts(prompts), padding="max_length", max_length=self.window, truncation=True, return_tensors="pt"
        ).to(self.encoder.device)
        mask = tokens["attention_mask"] if use_mask else None
        out = self.encoder(tokens["input_ids"], attention_mask=mask, output_hidden_states=self.hidden_layer is not None)
        if self.pooled_only:
            return None, out.pooler_output, tokens["attention_mask"]
        hidden = out.last_hidden_state if self.hidden_layer is None else out.hidden_states[self.hidden_layer]
        return hidden, getattr(out, "text_embeds", None), tokens["attention_mask"]


class PromptEncoder:
    """Frozen text towers combined as SDXL / SD3 do.

    CLIP towers' hidden states are concatenated along features; other towers (T5) are appended along the sequence,
    every block zero-padded to the widest feature size or to `width` (SD3's joint_attention_dim). "pooled" is the
    concatenation of the towers' pooled outputs. `zero_negative` makes the negative all zeros instead of the empty
    prompt's embeddings (SDXL's force_zeros_for_empty_prompt). A plain object, not an nn.Module, so that adapters
    can share it.
    """

    def __init__(
        self, towers: Sequence[TextTower], width: int | None = None, mask: bool = False, zero_negative: bool = False
    ):
        if not towers:
            raise ValueError("PromptEncoder needs at least one (tokenizer, text encoder) tower")
        self.towers, self.width, self.mask, self.zero_negative = list(towers), width, mask, zero_negative
        for tower in self.towers:
            tower.encoder.requires_grad_(False).eval()

    @property
    def modules(self) -> list[nn.Module]:
        return [tower.encoder for tower in self.towers]

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """The embedding dict of a list of prompts (no negative)."""
        outs = [(tower, *tower.encode(prompts, self.mask)) for tower in self.towers]
        # The towers that give hidden states (not pooled_only): their o[1] is a Tensor.
        hidden = cast("list[tuple[TextTower, Tensor, Tensor | None, Tensor]]", [o for o in outs if o[1] is not None])
        clip = [o for o in hidden if o[0].is_clip]
        blocks = [(torch.cat([o[1] for o in clip], dim=-1), clip[0][3])] if clip else []
        blocks += [(o[1], o[3]) for o in hidden if not o[0].is_clip]
        width = self.width or max(h.shape[-1] for h, _ in blocks)
        embeds = {"hidden": torch.cat([F.pad(h, (0, width - h.shape[-1])) for h, _ in blocks], dim=1)}
        pooled = [o[2] for o in outs if o[2] is not None]
        if pooled:
            embeds["pooled"] = torch.cat(pooled, dim=-1)
        if self.mask:
            embeds["mask"] = torch.cat([m for _, m in blocks], dim=1)
        return embeds

    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        """Embeddings of the prompts; those of the empty prompt (or zeros) repeated over the batch as `negative`."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("cannot encode an empty list of prompts")
        for tower in self.towers:
            for prompt in tower.too_long(prompts):
                warnings.warn(
                    f"prompt {prompt[:60]!r} is longer than the {tower.window}-token window of "
                    f"{type(tower.tokenizer).__name__}; it is truncated",
                    stacklevel=3,
                )
        empty = self.embed([""])
        if self.zero_negative:
            empty = {k: torch.zeros_like(v) for k, v in empty.items()}
        negative = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in empty.items()}
        return Conditioning(prompts, self.embed(prompts), negative)
