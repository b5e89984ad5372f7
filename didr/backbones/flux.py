"""diffusers FluxTransformer2DModel over the rectified-flow schedule (FLUX.1-dev, FLUX.1-schnell)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from didr.backbones.adapter import DiffusersDenoiser
from didr.backbones.base import Conditioning
from didr.backbones.text import PromptEncoder
from didr.diffusion import FlowSchedule, expand_like, x0_from_flow_velocity


def pack(latents: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of `pack` (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[(H/2)(W/2), 3] token positions (0, row, col) (FluxPipeline._prepare_latent_image_ids)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxDenoiser(DiffusersDenoiser):
    """FLUX.1: rectified flow on VAE latents, v = eps - x0, x0 = x_t - t v.

    sample_shape is the unpacked latent (C, H, W), C = in_channels / 4; the transformer sees 2x2-packed tokens with
    img_ids (0, row, col), txt_ids zeros, "hidden" (T5) as encoder_hidden_states and "pooled" (CLIP's pooler_output)
    as pooled_projections. Its timestep is t itself: FluxPipeline feeds timestep / 1000 = sigma and the transformer
    multiplies by 1000 (so FlowSchedule.model_timestep, SD3's t * 1000, is not used).

    Guidance. A guidance-distilled network (guidance_embeds, FLUX.1-dev) takes the scale as an input: x0(..., w) is
    one conditional pass with w in the guidance embedding (FluxPipeline's guidance_scale, default 3.5) and the
    negative is unused; predict_x0, the unguided prediction, embeds w = 1. Without the embedding (FLUX.1-schnell)
    x0(..., w) is the usual two-branch CFG against the empty prompt (FluxPipeline's true_cfg_scale = w with
    negative_prompt=""); w = 1 is one conditional pass, as the pipeline runs schnell.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: FlowSchedule,
        text: PromptEncoder,
        vae: nn.Module | None,
        precision: str = "fp32",
        latent_size: tuple[int, int] = (128, 128),
    ):
        if any(n % 2 for n in latent_size):
            raise ValueError(f"FLUX packs 2x2 latent patches: the latent size must be even, got {latent_size}")
        config: Any = net.config  # diffusers' FrozenDict, its keys also attributes
        super().__init__(net, schedule, text, vae, precision, sample_shape=(config.in_channels // 4, *latent_size))

    @property
    def guidance_distilled(self) -> bool:
        config: Any = self.net.config  # diffusers' FrozenDict, its keys also attributes
        return bool(config.guidance_embeds)

    def x0_at(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor], guidance: float) -> Tensor:
        """x0 = x_t - t v, v the unpacked velocity; `guidance` goes to the embedding when the network has one."""
        height, width = x_t.shape[-2:]
        hidden = embeds["hidden"]
        v = self.native(
            pack(x_t),
            encoder_hidden_states=hidden,
            pooled_projections=embeds["pooled"],
            timestep=t,
            guidance=torch.full_like(t, guidance) if self.guidance_distilled else None,
            img_ids=image_ids(height, width, x_t.device, x_t.dtype),
            txt_ids=torch.zeros(hidden.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
        )
        return x0_from_flow_velocity(x_t, unpack(v, height, width), expand_like(t, x_t))

    def predict_x0(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """The conditional x0 (guidance embedding 1 for a guidance-distilled network)."""
        return self.x0_at(x_t, t, embeds, 1.0)

    def x0(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance: float = 1.0) -> Tensor:
        """Guidance-distilled: one pass with `guidance` embedded. Otherwise CFG, x0_u + w (x0_c - x0_u)."""
        if self.guidance_distilled:
            return self.x0_at(x_t, t, cond.embeds, guidance)
        return super().x0(x_t, t, cond, guidance)
