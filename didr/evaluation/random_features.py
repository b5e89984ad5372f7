"""A bank of random convolutional features: fidelity features that nothing was trained to be invariant to.

A classifier's features are trained to ignore what does not change its labels (the toy world's alignment scorer is
trained on blurred and noisy renders), so FID on them cannot see blur or noise. Random filters keep that
information. On x = 2 image - 1, with fixed, seeded, unit-norm Gaussian weights and nothing trained:
- edges and texture: at each scale (x average-pooled by 1, 2, 4) a bank of 3x3 filters whose weights sum to zero per
  input channel (so flat regions of any colour respond 0), rectified;
- colour: a bank of 1x1 filters whose weights sum to zero over R, G, B (so grey responds 0), rectified;
each filter summarised by log(mean + eps) and log(std + eps) of its response over positions (the log makes a
relative change of a faint response, such as noise on a flat background, count as much as one of a strong response).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from didr.evaluation.features import FeatureContext, FeatureSet

SCALES = (1, 2, 4)
EDGE_FILTERS = 32
COLOUR_FILTERS = 16
EPS = 1e-2
SEED = 20261205


class RandomConvBank(nn.Module):
    """Features [N, 2 (len(scales) edge_filters + colour_filters)] of images [N, 3, H, W] in [0, 1]."""

    edges: Tensor  # [scales, filters, 3, 3, 3]
    colours: Tensor  # [filters, 3]

    def __init__(
        self,
        scales: tuple[int, ...] = SCALES,
        edge_filters: int = EDGE_FILTERS,
        colour_filters: int = COLOUR_FILTERS,
        seed: int = SEED,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        edges = torch.randn(len(scales), edge_filters, 3, 3, 3, generator=generator)
        edges = edges - edges.mean((3, 4), keepdim=True)
        colours = torch.randn(colour_filters, 3, generator=generator)
        colours = colours - colours.mean(1, keepdim=True)
        self.register_buffer("edges", edges / edges.flatten(2).norm(dim=2)[:, :, None, None, None])
        self.register_buffer("colours", colours / colours.norm(dim=1, keepdim=True))
        self.scales = scales

    @staticmethod
    def _summary(response: Tensor) -> list[Tensor]:
        rectified = F.relu(response).flatten(2)
        return [torch.log(rectified.mean(2) + EPS), torch.log(rectified.std(2) + EPS)]

    def forward(self, images: Tensor) -> Tensor:
        x = images * 2 - 1
        parts = []
        for scale, weight in zip(self.scales, self.edges, strict=True):
            pooled = F.avg_pool2d(x, scale) if scale > 1 else x
            parts += self._summary(F.conv2d(pooled, weight.to(x.dtype), padding=1))
        parts += self._summary(torch.einsum("kc,nchw->nkhw", self.colours.to(x.dtype), x))
        return torch.cat(parts, 1)


class RandomConvFeatures(FeatureSet):
    """A world's real images seen through `RandomConvBank`; `real_images(prompts, size, seed)` gives the real images
    [N, 3, size, size] in [0, 1] for the prompts (rendered with the experiment's seed)."""

    def __init__(self, context: FeatureContext, real_images: Callable[[list[str], int, int], Tensor], name: str):
        self.bank = RandomConvBank().to(context.device)
        self.real_images, self.seed = real_images, context.seed
        super().__init__(self.bank, name, context.device)

    def real(self, prompts: list[str], size: int) -> Tensor:
        return self.features(self.real_images(prompts, size, self.seed))
