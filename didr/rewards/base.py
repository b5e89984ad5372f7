"""The reward interface: differentiable r(images in [0, 1], prompts) -> one score per image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from didr.backbones.base import Conditioning


class Reward(Protocol):
    """reward(images [B, ...] in the decoder's output space, prompts) -> Tensor [B], differentiable in images."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


DRSFn = Callable[[Tensor, Tensor, "Conditioning"], Tensor]
"""A Diffused Reward Score (x_t, t, cond) -> DRS_t(x_t) in score units, e.g. an exact closed form."""
