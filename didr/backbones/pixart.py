"""diffusers PixArtTransformer2DModel (PixArt-alpha / sigma) over a VP schedule, eps-prediction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from didr.backbones.adapter import DiffusersDenoiser
from didr.backbones.base import Conditioning
from didr.backbones.text import PromptEncoder
from didr.diffusion import VPSchedule, expand_like, x0_from_eps


class PixArtDenoiser(DiffusersDenoiser):
    """x0 = (x_t - s eps) / a, eps the first half of the learned-sigma output, with the T5 attention mask.

    Networks with additional conditions (PixArt-alpha 1024) get the pixel resolution and aspect ratio of
    sample_shape (vae_scale_factor pixels per latent); others get None for both, as diffusers' pipeline passes.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: VPSchedule,
        text: PromptEncoder,
        vae: nn.Module | None = None,
        precision: str = "fp32",
        vae_scale_factor: int = 8,
    ):
        super().__init__(net, schedule, text, vae, precision)
        self.vae_scale_factor = vae_scale_factor

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Each prompt lower-cased and stripped first, as diffusers' PixArt pipelines do (clean_caption=False): the
        teacher was trained on such text, and an exported pipeline conditions the same way."""
        return super().encode_prompts([prompt.lower().strip() for prompt in prompts])

    def added_cond_kwargs(self, x_t: Tensor) -> dict[str, Tensor | None]:
        if not self.net.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        height, width = (self.vae_scale_factor * n for n in self.sample_shape[1:])
        batch = x_t.shape[0]
        resolution = torch.tensor([height, width], dtype=x_t.dtype, device=x_t.device).repeat(batch, 1)
        aspect = torch.tensor([height / width], dtype=x_t.dtype, device=x_t.device).repeat(batch, 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def predict_x0(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """VP eps-prediction (learned-variance half dropped): x0 = (x_t - s eps) / a."""
        eps = self.native(
            x_t,
            encoder_hidden_states=embeds["hidden"],
            encoder_attention_mask=embeds.get("mask"),
            timestep=self.schedule.model_timestep(t),
            added_cond_kwargs=self.added_cond_kwargs(x_t),
        )
        a, s = (expand_like(v, x_t) for v in self.schedule.alpha_sigma(t))
        return x0_from_eps(x_t, eps, a, s)
