"""The warm-up: the fake score fitted by denoising score matching to the frozen, un-aligned generator's samples.

One function whose hyper-parameters are keyword arguments (the EDM style), like the alignment loop: each step draws
prompts and noise, samples the generator without gradients and takes one AdamW step of the fake score's loss.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from didr.backbones.base import Conditioning, Denoiser
from didr.objectives.fake_score import FakeScoreLoss
from didr.training.loop import draw_batch


def warm_up_fake(
    generator: nn.Module,
    fake: Denoiser,
    prompts: Conditioning,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    fake_loss: FakeScoreLoss | None = None,
    adam_betas: tuple[float, float] = (0.0, 0.999),
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Fit `fake` (its trainable parameters) to `generator`'s samples for `steps` steps of `batch_size` prompts drawn
    with replacement from `prompts`; `fake_loss` defaults to FakeScoreLoss(fake). Returns every step's loss."""
    device = next(generator.parameters()).device
    fake_loss = fake_loss or FakeScoreLoss(fake)
    optimiser = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=lr, betas=adam_betas)
    rng = torch.Generator(device=device).manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="warmup", disable=not progress):
        z, cond = draw_batch(generator, prompts, batch_size, rng)  # as the alignment loop draws
        with torch.no_grad():
            x0 = generator(z, cond)
        loss, logs = fake_loss(x0, cond, rng)
        optimiser.zero_grad(set_to_none=True)
        loss.mean().backward()
        optimiser.step()
        losses.append(logs["loss_fake"])
    return losses
