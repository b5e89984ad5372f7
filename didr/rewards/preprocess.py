"""Tensor-only image preprocessing for the real rewards: differentiable stand-ins for their PIL pipelines.

Images are [B, 3, H, W] in [0, 1]. Resizing is `F.interpolate(mode="bicubic", antialias=True)`, PyTorch's port of
Pillow's resampler (cubic kernel a = -0.5, support widened by the scale when shrinking). Against the originals:
- Pillow (openai-clip, BLIP / ImageReward, transformers' CLIPImageProcessor with either backend, all of which agree)
  resamples uint8 images, rounding each pass to a grey level and clipping it to [0, 255]. `clip_pixels` clamps to
  [0, 1] after resizing likewise but stays in float: measured max |difference| after normalisation 0.009 (512 -> 32),
  0.017 (64 -> 32), 0.034 (a noisy 48 x 40 -> 32, 2.3 grey levels at sharp edges), mean about 0.004. The clamp
  zeroes the gradient only of the pixels where bicubic ringing overshoots [0, 1].
- hpsv2 converts to a float tensor before its torchvision resize, so `resize_longest_pad` is that very operation
  (equal to float error, no clamp).
- Center crops start at round((H - h) / 2) as torchvision's CenterCrop (openai-clip, BLIP / ImageReward);
  transformers' CLIPImageProcessor uses floor((H - h) / 2), one pixel apart when H - h is 3 mod 4 (never for the
  square images generators produce).

OpenAI CLIP's mean and std are also those of OpenCLIP's ViT-H-14 (HPSv2, PickScore's processor) and of BLIP
(ImageReward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(images: Tensor, height: int, width: int) -> Tensor:
    """Antialiased bicubic resize to (height, width); the identity when the size already matches."""
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Shortest side to `size` (longest to int(size * long / short)), then the central size x size square."""
    h, w = images.shape[-2:]
    short, long = min(h, w), max(h, w)
    scaled = int(size * long / short)
    images = resize(images, size, scaled) if h <= w else resize(images, scaled, size)
    top = round((images.shape[-2] - size) / 2)
    left = round((images.shape[-1] - size) / 2)
    return images[..., top : top + size, left : left + size]


def resize_longest_pad(images: Tensor, size: int) -> Tensor:
    """Longest side to `size` (shortest to round(short * size / long)), then zero (black) padding to a centred
    size x size square, as hpsv2's ResizeMaxSize."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    if scale == 1:
        return images
    new_h, new_w = round(h * scale), round(w * scale)
    images = resize(images, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def normalize(images: Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """(x - mean_c) / std_c per channel."""
    return (images - images.new_tensor(mean)[:, None, None]) / images.new_tensor(std)[:, None, None]


def clip_pixels(images: Tensor, size: int) -> Tensor:
    """CLIP's preprocessing: shortest side to `size`, center crop, clamp to [0, 1] (as uint8 output), normalise."""
    return normalize(resize_center_crop(images, size).clamp(0, 1))
