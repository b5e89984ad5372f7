"""The warm-up: the fake score fitted by denoising score matching to the frozen, un-aligned generator's samples.

One function whose hyper-parameters are keyword arguments (the EDM style), like the alignment loop: each step draws
prompts and noise, samples the generator without gradients and takes one AdamW step of the fake score's loss.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import SlicedGenerator
from didr.objectives.fake_score import FakeScoreLoss
from didr.training.distributed import Processes, check_batch
from didr.training.loop import FakeStep, draw_batch, micro_batches


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
    accumulation: int = 1,
    processes: Processes | None = None,
    progress: bool = False,
) -> list[float]:
    """Fit `fake` (its trainable parameters) to `generator`'s samples for `steps` steps of `batch_size` prompts drawn
    with replacement from `prompts`; `fake_loss` defaults to FakeScoreLoss(fake). Returns every step's loss.
    `batch_size` is the global batch, split over `processes` and `accumulation` micro-batches as in `align`."""
    device = next(generator.parameters()).device
    processes = processes or Processes(device)
    micro = check_batch(batch_size, processes.world, accumulation, key="warmup.batch_size")
    fake_loss = fake_loss or FakeScoreLoss(fake)
    processes.shard(fake)  # fsdp: in place, before its optimiser is made
    optimiser = torch.optim.AdamW([p for p in fake.parameters() if p.requires_grad], lr=lr, betas=adam_betas)
    step_module = processes.wrap(FakeStep(fake, fake_loss))
    rng = SlicedGenerator(device, parts=processes.world * accumulation)
    rng.manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="warmup", disable=not (progress and processes.main)):
        optimiser.zero_grad(set_to_none=True)
        rows = []
        for last in micro_batches(rng, processes, accumulation):
            z, cond = draw_batch(generator, prompts, micro, rng)  # as the alignment loop draws
            with torch.no_grad():
                x0 = generator(z, cond)
            with processes.accumulating(step_module, sync=last):
                loss, logs = step_module(x0, cond, rng)
                (loss.mean() / accumulation).backward()
            rows.append(logs["loss_fake"])
        optimiser.step()
        losses.append(processes.mean({"loss_fake": sum(rows) / len(rows)})["loss_fake"])
    return losses
