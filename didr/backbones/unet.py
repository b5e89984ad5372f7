"""diffusers UNet2DConditionModel over a VP schedule (SD1.5, SD2, SDXL with its size / crop micro-conditioning)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from didr.backbones.adapter import DiffusersDenoiser
from didr.backbones.text import PromptEncoder
from didr.diffusion import VPSchedule, expand_like, x0_from_eps, x0_from_v

PREDICTION_TYPES = ("epsilon", "v_prediction")


class UNetDenoiser(DiffusersDenoiser):
    """x0 from a UNet's eps (x0 = (x_t - s eps) / a) or v (x0 = a x_t - s v) at timestep t (T - 1).

    A "text_time" UNet (SDXL) also gets added_cond_kwargs as StableDiffusionXLPipeline builds them: text_embeds the
    "pooled" embedding (text_encoder_2's projection) and time_ids = original_size + crops_coords_top_left (0, 0) +
    target_size, both sizes the pixel size of sample_shape (vae_scale_factor pixels per latent).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: VPSchedule,
        text: PromptEncoder,
        vae: nn.Module | None = None,
        prediction_type: str = "epsilon",
        precision: str = "fp32",
        vae_scale_factor: int = 8,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"UNet prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        super().__init__(net, schedule, text, vae, precision)
        self.prediction_type, self.vae_scale_factor = prediction_type, vae_scale_factor

    def time_ids(self, x_t: Tensor) -> Tensor:
        """SDXL's [B, 6] (height, width, 0, 0, height, width) of StableDiffusionXLPipeline._get_add_time_ids."""
        height, width = (self.vae_scale_factor * n for n in self.sample_shape[1:])
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=x_t.dtype, device=x_t.device)
        return ids.repeat(x_t.shape[0], 1)

    def predict_x0(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """eps: x0 = (x_t - s eps) / a; v: x0 = a x_t - s v."""
        added = None
        config: Any = self.net.config  # diffusers' FrozenDict, its keys also attributes
        if config.addition_embed_type == "text_time":
            added = {"text_embeds": embeds["pooled"], "time_ids": self.time_ids(x_t)}
        out = self.native(
            x_t,
            timestep=self.schedule.model_timestep(t),
            encoder_hidden_states=embeds["hidden"],
            added_cond_kwargs=added,
        )
        a, s = (expand_like(v, x_t) for v in self.schedule.alpha_sigma(t))
        return x0_from_eps(x_t, out, a, s) if self.prediction_type == "epsilon" else x0_from_v(x_t, out, a, s)
