"""diffusers ZImageTransformer2DModel over the rectified-flow schedule (Z-Image, Z-Image-Turbo)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from didr.backbones.adapter import DiffusersDenoiser
from didr.backbones.text import PromptEncoder
from didr.diffusion import FlowSchedule, expand_like, flow_velocity_from_zimage, x0_from_flow_velocity, zimage_time


class ZImageDenoiser(DiffusersDenoiser):
    """Z-Image: rectified flow on VAE latents in the tau / u convention, x0 = x_t - t v with v = -u.

    As ZImagePipeline: the transformer gets a list of [C, 1, H, W] latents, tau = 1 - t (the pipeline's
    (1000 - timestep) / 1000; the network multiplies by t_scale) and one caption per sample, the Qwen3 hidden
    states of its real tokens ("hidden" rows where "mask" is set); it returns u = -v per sample.

    Guidance: x0(..., g) is CFG on x0 against the empty prompt, the same as the pipeline's on u since x0 is affine
    in u; the pipeline's pred = pos + w (pos - neg) is g = 1 + w (its default guidance_scale 5 is g = 6; Turbo's 0
    is g = 1, one conditional pass). Its cfg_normalization and cfg_truncation are supported only at their defaults
    (off: False and 1.0).
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
        config: Any = net.config  # diffusers' FrozenDict, its keys also attributes
        patch = config.all_patch_size[0]
        if any(n % patch for n in latent_size):
            raise ValueError(f"Z-Image patches the latents {patch}x{patch}: latent size {latent_size} does not divide")
        super().__init__(net, schedule, text, vae, precision, sample_shape=(config.in_channels, *latent_size))

    def predict_x0(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """u = net([x_t], 1 - t, captions); v = -u; x0 = x_t - t v."""
        captions = [h[m.bool()] for h, m in zip(embeds["hidden"], embeds["mask"], strict=True)]
        with self.autocast():
            out = self.net(list(x_t.unsqueeze(2).unbind(0)), zimage_time(t), captions, return_dict=False)[0]
        v = flow_velocity_from_zimage(torch.stack(out).squeeze(2).to(x_t.dtype))
        return x0_from_flow_velocity(x_t, v, expand_like(t, x_t))
