"""Shared machinery of the diffusers adapters: frozen parts kept out of the module tree, VAE decoding, copies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from didr.backbones.base import Conditioning, Denoiser
from didr.backbones.text import PromptEncoder
from didr.backbones.tuning import autocast, check_precision
from didr.diffusion import Schedule


class FrozenParts:
    """The frozen text towers and VAE of an adapter: a plain holder, so they are not parameters of the adapter
    and trainable copies share them instead of duplicating them."""

    def __init__(self, text: PromptEncoder, vae: nn.Module | None = None):
        self.text, self.vae = text, vae
        if vae is not None:
            vae.requires_grad_(False).eval()

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenParts:
        """Every copy of an adapter (trainable copies, the generator's EMA) shares the frozen parts."""
        return self

    @property
    def modules(self) -> list[nn.Module]:
        return self.text.modules + ([] if self.vae is None else [self.vae])


class DiffusersDenoiser(Denoiser):
    """A Denoiser over one diffusers network `net`; only `net` is registered, so parameters() are the network's.

    Moving the adapter (`.to`, `.cuda`, ...) moves the frozen parts too, shared copies included.
    """

    net: nn.Module

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        text: PromptEncoder,
        vae: nn.Module | None,
        precision: str,
        sample_shape: tuple[int, ...] | None = None,
    ):
        """`sample_shape` defaults to (in_channels, sample_size) of the network's config (networks without one,
        FLUX and Z-Image, pass it)."""
        super().__init__()
        self.net, self.schedule = net, schedule
        self.frozen_parts = FrozenParts(text, vae)
        self.precision = check_precision(precision)
        if sample_shape is None:
            config: Any = net.config  # diffusers' FrozenDict, its keys also attributes
            size = config.sample_size
            sample_shape = (int(config.in_channels), *((size, size) if isinstance(size, int) else size))
        self.sample_shape = tuple(sample_shape)

    def autocast(self) -> Any:
        """bf16 autocast around network calls when precision is 'bf16'."""
        return autocast(self.precision, self.device)

    def native(self, x_t: Tensor, **kwargs: Any) -> Tensor:
        """net(x_t, **kwargs) under the adapter's precision, in x_t's dtype; a learned-variance half is dropped."""
        with self.autocast():
            out = self.net(x_t, return_dict=False, **kwargs)[0]
        if out.shape[1] == 2 * x_t.shape[1]:
            out = out[:, : x_t.shape[1]]
        return out.to(x_t.dtype)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return self.frozen_parts.text(prompts).to(self.device)

    def decode(self, x0: Tensor) -> Tensor:
        """Pixel models: (x0 + 1) / 2. Latent models: (vae.decode(x0 / scaling_factor + shift_factor) + 1) / 2."""
        # A diffusers autoencoder: its decode, dtype and config keys are not on nn.Module.
        vae: Any = self.frozen_parts.vae
        if vae is None:
            return super().decode(x0)
        latents = x0 / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        with self.autocast():
            image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (image.to(x0.dtype) + 1) / 2

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> DiffusersDenoiser:
        for module in self.frozen_parts.modules:
            module._apply(fn, recurse)
        return super()._apply(fn, recurse)
