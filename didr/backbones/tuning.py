"""Fine-tuning knobs shared by the diffusers adapters: LoRA, gradient checkpointing and bf16 autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers.loaders.peft import PeftAdapterMixin
    from diffusers.models.modeling_utils import ModelMixin


PRECISIONS = ("fp32", "bf16")


class HasNetwork(Protocol):
    """An adapter exposing its denoising network as `.net` (a diffusers ModelMixin)."""

    net: nn.Module


class HasVae(Protocol):
    """The frozen parts an adapter keeps outside its module tree (didr.backbones.adapter.FrozenParts): its VAE."""

    @property
    def vae(self) -> nn.Module | None: ...


class HasFrozenParts(HasNetwork, Protocol):
    """A diffusers adapter: its network, and the frozen text towers and VAE it keeps outside its module tree."""

    @property
    def frozen_parts(self) -> HasVae: ...


def check_precision(precision: str) -> str:
    """Validate a precision name ('fp32' or 'bf16')."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast to bfloat16 on `device` for 'bf16', a no-op for 'fp32' (weights stay fp32 either way)."""
    if check_precision(precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def add_lora(
    denoiser: HasNetwork,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
) -> int:
    """Inject a peft LoRA (scale alpha / rank, alpha defaults to rank) into the network; freeze everything else.

    Goes through diffusers' add_adapter where the network has it, else peft's inject_adapter_in_model.
    B starts at zero, so the output is unchanged at initialisation. Returns the number of trainable parameters.
    Apply it to a trainable copy, not to a teacher whose network the copy would otherwise share.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    net = denoiser.net
    net.requires_grad_(False)
    # peft annotates lora_alpha as an int, but only divides by it (scaling = lora_alpha / r): a float alpha works.
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,  # type: ignore[arg-type]
        target_modules=list(target_modules),
    )
    if hasattr(net, "add_adapter"):
        cast("PeftAdapterMixin", net).add_adapter(config)
    else:  # diffusers networks without PeftAdapterMixin (PixArt)
        inject_adapter_in_model(config, net)
    lora = [p for name, p in net.named_parameters() if "lora_" in name]
    for p in lora:
        p.requires_grad_(True)
    return sum(p.numel() for p in lora)


def enable_gradient_checkpointing(denoiser: HasNetwork) -> None:
    """Recompute the network's block activations in the backward pass (diffusers' own checkpointing)."""
    cast("ModelMixin", denoiser.net).enable_gradient_checkpointing()


def checkpoint_frozen_parts(denoiser: HasFrozenParts) -> None:
    """Recompute the frozen teacher's network and VAE decoder activations in the backward pass: the memory of a
    reward gradient taken through them (DIDR's proxy, DI++'s reward at the decoded sample) at the cost of a second
    forward."""
    cast("ModelMixin", denoiser.net).enable_gradient_checkpointing()
    vae = denoiser.frozen_parts.vae
    if vae is not None:
        cast("ModelMixin", vae).enable_gradient_checkpointing()
