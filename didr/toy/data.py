"""The embedded world's data: small RGB images of one shape, with compositional prompts.

Each image is (shape, colour, position, background) from a fixed vocabulary, rendered with soft, anti-aliased edges
from signed distances, with a little seeded jitter in size, place and tint. Prompts read
"a {colour} {shape} at the {position} on {background}"; `parse_prompt` inverts `prompt_of`. Images are in [-1, 1].

Why the shapes are large (radius 0.38-0.42 of the side, centres 0.14 of the side apart): the toy teacher learns the
shape word last, because the conditional means of the shapes differ in few pixels. With radius 0.2-0.25 its 25-step
samples matched their prompt's shape in 33% of draws (chance 25%) after the default training; at this size 84%
(59-85% over three training seeds; docs/embedded_world.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

VOCAB: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "position": ("left", "right", "top", "bottom", "centre"),
    "background": ("black", "white", "gray"),
}
ATTRIBUTES = tuple(VOCAB)
COLOURS = {
    "red": (0.95, 0.1, 0.1),
    "green": (0.1, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "magenta": (0.85, 0.1, 0.85),
    "cyan": (0.1, 0.85, 0.9),
}
BACKGROUNDS = {"black": 0.05, "white": 0.95, "gray": 0.5}
CENTRES = {"left": (0.36, 0.5), "right": (0.64, 0.5), "top": (0.5, 0.36), "bottom": (0.5, 0.64), "centre": (0.5, 0.5)}
RADIUS = (0.38, 0.04)
"""A shape's radius as a fraction of the image side: RADIUS[0] + RADIUS[1] * U[0, 1]."""
PLACE_JITTER = 0.06
"""Width of the uniform jitter of a shape's centre about its position, as a fraction of the side."""
SQUARE_HALF_SIDE = 0.9
"""A square's half side as a fraction of the radius (its corners reach 1.27 r, the circle r)."""


@dataclass
class ToyData:
    """Images [N, 3, S, S] in [-1, 1], attribute labels [N, 4] (indices into VOCAB, in ATTRIBUTES order), prompts."""

    images: Tensor
    labels: Tensor
    prompts: list[str]


def prompt_of(labels: Tensor | tuple[int, ...]) -> str:
    """The prompt of one attribute tuple (shape, colour, position, background)."""
    shape, colour, position, background = (VOCAB[a][int(i)] for a, i in zip(ATTRIBUTES, labels, strict=True))
    return f"a {colour} {shape} at the {position} on {background}"


def parse_prompt(prompt: str) -> Tensor:
    """Attribute indices [4] of a prompt written by `prompt_of`; ValueError naming the prompt otherwise."""
    words = prompt.strip().lower().split()
    if len(words) != 8 or words[0] != "a" or words[3:5] != ["at", "the"] or words[6] != "on":
        raise ValueError(f"not a toy-world prompt: {prompt!r}")
    found = {"colour": words[1], "shape": words[2], "position": words[5], "background": words[7]}
    try:
        return torch.tensor([VOCAB[a].index(found[a]) for a in ATTRIBUTES])
    except ValueError:
        raise ValueError(f"not a toy-world prompt: {prompt!r} (unknown word)") from None


def all_labels() -> Tensor:
    """Every attribute combination, [4 * 6 * 5 * 3, 4], in lexicographic order."""
    return torch.tensor(list(itertools.product(*(range(len(VOCAB[a])) for a in ATTRIBUTES))))


def sample_labels(n: int, generator: torch.Generator) -> Tensor:
    """n attribute tuples drawn uniformly."""
    return torch.stack([torch.randint(len(VOCAB[a]), (n,), generator=generator) for a in ATTRIBUTES], dim=1)


def _signed_distance(shape: Tensor, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """Signed distance (pixels, < 0 inside) of each image's shape; dx, dy [N, S, S] from its centre, r [N, 1, 1]."""
    circle = (dx**2 + dy**2).sqrt() - r
    square = torch.maximum(dx.abs(), dy.abs()) - SQUARE_HALF_SIDE * r
    triangle = torch.maximum(dy - 0.8 * r, (1.7 * dx.abs() - (dy + r)) / 1.97)  # apex up at -r, base at 0.8 r
    bar = r / 3
    cross = torch.minimum(torch.maximum(dx.abs() - r, dy.abs() - bar), torch.maximum(dx.abs() - bar, dy.abs() - r))
    stacked = torch.stack([circle, square, triangle, cross], dim=1)  # [N, 4, S, S], VOCAB['shape'] order
    return stacked.gather(1, shape[:, None, None, None].expand(-1, 1, *dx.shape[1:]))[:, 0]


def render(labels: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Images [N, 3, size, size] in [-1, 1] for attribute labels [N, 4], with seeded jitter."""
    n = labels.shape[0]
    jitter = torch.rand(n, 5, generator=generator)
    centres = torch.tensor([CENTRES[p] for p in VOCAB["position"]])[labels[:, 2]] * size
    cx = centres[:, 0] + (jitter[:, 0] - 0.5) * PLACE_JITTER * size
    cy = centres[:, 1] + (jitter[:, 1] - 0.5) * PLACE_JITTER * size
    r = (RADIUS[0] + RADIUS[1] * jitter[:, 2]) * size
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dx = (grid[None, None, :] - cx[:, None, None]).expand(n, size, size)
    dy = (grid[None, :, None] - cy[:, None, None]).expand(n, size, size)
    mask = torch.sigmoid(-_signed_distance(labels[:, 0], dx, dy, r[:, None, None]) * 3.0)[:, None]
    colour = torch.tensor([COLOURS[c] for c in VOCAB["colour"]])[labels[:, 1]]
    colour = (colour * (0.9 + 0.1 * jitter[:, 3:4])).clamp(0, 1)[:, :, None, None]
    background = torch.tensor([BACKGROUNDS[b] for b in VOCAB["background"]])[labels[:, 3]]
    background = (background + 0.04 * (jitter[:, 4] - 0.5))[:, None, None, None].expand(-1, 3, 1, 1)
    return (background * (1 - mask) + colour * mask) * 2 - 1


def make_dataset(n: int, size: int = 16, seed: int = 0) -> ToyData:
    """n images with uniformly drawn attributes, deterministic in (n, size, seed)."""
    if n < 1 or size < 8:
        raise ValueError(f"toy data needs n >= 1 and size >= 8, got n={n}, size={size}")
    generator = torch.Generator().manual_seed(seed)
    labels = sample_labels(n, generator)
    return ToyData(render(labels, size, generator), labels, [prompt_of(row) for row in labels])


def prompt_sets(eval_count: int = 64, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training prompts, evaluation prompts): every combination, with a seeded subset held out for evaluation."""
    prompts = [prompt_of(row) for row in all_labels()]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:eval_count])
    return [p for i, p in enumerate(prompts) if i not in held_out], [prompts[i] for i in sorted(held_out)]
