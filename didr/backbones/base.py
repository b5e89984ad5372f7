"""The one interface every teacher, fake score and generator body implements (ARCHITECTURE.md, backbones).

A Denoiser predicts x0 in the units of its own sample space (pixels, VAE latents, or R^d for an analytic model),
applies classifier-free guidance on x0 (equivalent to guidance on eps or v at the same x_t, since the conversions
are affine in the prediction), encodes prompts into a Conditioning and decodes samples to images in [0, 1].
"""

from __future__ import annotations

import copy
import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

import torch
from torch import Tensor, nn

from didr.diffusion import Schedule


@dataclass
class Conditioning:
    """Encoded prompts: the backbone's named embedding tensors (batch first) and those of the empty prompt."""

    prompts: list[str]
    embeds: dict[str, Tensor] = field(default_factory=dict)
    negative: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Tensor) -> Conditioning:
        """The rows `index` of the batch (for drawing a prompt batch out of a cached prompt set)."""
        take = {k: v[index.to(v.device)] for k, v in self.embeds.items()}
        negative = None if self.negative is None else {k: v[index.to(v.device)] for k, v in self.negative.items()}
        return Conditioning([self.prompts[int(i)] for i in index], take, negative)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        """The same conditioning on `device`; floating tensors cast to `dtype` when given."""

        def move(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {
                k: v.to(device, dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
                for k, v in d.items()
            }

        return Conditioning(self.prompts, move(self.embeds), None if self.negative is None else move(self.negative))


def check_t_star(t_star: float) -> float:
    """The conditioning time of a one-step generator must lie in (0, 1]."""
    if not 0 < t_star <= 1:
        raise ValueError(f"t_star must lie in (0, 1], got {t_star}")
    return t_star


class Denoiser(nn.Module, ABC):
    """x0 predictor over a schedule, with CFG, prompt encoding and decoding (docs/algorithm.md §1)."""

    schedule: Schedule
    sample_shape: tuple[int, ...]

    @abstractmethod
    def predict_x0(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """x0_hat at (x_t, t) for one set of embeddings, no guidance; t is a vector [B] in [0, 1]."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text embeddings of the prompts and of the empty prompt (for CFG), on this module's device."""

    def decode(self, x0: Tensor) -> Tensor:
        """Samples to images in [0, 1] (pixel models map [-1, 1] affinely; latent models run their VAE)."""
        return (x0 + 1) / 2

    def x0(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance: float = 1.0) -> Tensor:
        """Guided x0_hat = x0_u + w (x0_c - x0_u); w = 1 is the plain conditional prediction.

        Both branches run as one batch of 2B.
        """
        if guidance == 1.0 or cond.negative is None:
            return self.predict_x0(x_t, t, cond.embeds)
        both = {k: torch.cat([cond.negative[k], v]) for k, v in cond.embeds.items()}
        x0_u, x0_c = self.predict_x0(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return x0_u + guidance * (x0_c - x0_u)

    def trainable_copy(self) -> Self:
        """An independent copy whose parameters train (for the fake score, or the generator's body)."""
        clone = copy.deepcopy(self)
        clone.requires_grad_(True)
        return clone.train()

    def shared_copy(self) -> Self:
        """A copy of the modules that shares every parameter and buffer with this one: LoRA adapters added to it train
        alone while the frozen weights exist once (the fake score and generator of a LoRA run)."""
        memo = {id(tensor): tensor for tensor in itertools.chain(self.parameters(), self.buffers())}
        return copy.deepcopy(self, memo)

    @property
    def device(self) -> torch.device:
        tensor: Tensor | None = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()))
        return tensor.device

    def frozen(self) -> Self:
        """This module with gradients off for its parameters, in eval mode (the teacher)."""
        self.requires_grad_(False)
        return self.eval()
