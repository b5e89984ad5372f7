"""The alignment loop: two time-scale updates of the fake score and the one-step generator (ALGORITHM.md section 1).

One function whose hyper-parameters are keyword arguments (the EDM style). Each step first fits the fake score
`fake_updates` times on fresh detached generator samples, then takes one generator step on the objective, then
updates the EMA of the generator.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from didr.backbones.base import Conditioning, Denoiser
from didr.objectives.fake_score import FakeScoreLoss

Objective = Callable[[Tensor, Conditioning, torch.Generator], tuple[Tensor, dict[str, float]]]


@dataclass
class AlignmentResult:
    """The trained generator, its EMA (the one to sample from), and one dict of logged scalars per step."""

    generator: nn.Module
    ema: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)


def _draw(
    generator: nn.Module, prompts: Conditioning, batch_size: int, rng: torch.Generator
) -> tuple[Tensor, Conditioning]:
    """A batch of noise z ~ N(0, I) and prompts drawn with replacement from the prompt set."""
    param = next(generator.parameters())
    index = torch.randint(len(prompts), (batch_size,), generator=rng, device=rng.device)
    z = torch.randn((batch_size, *generator.sample_shape), generator=rng, device=rng.device, dtype=param.dtype)
    return z.to(param.device), prompts.select(index)


def _lr_factor(schedule: str, step: int, steps: int) -> float:
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * step / steps))


def align(
    generator: nn.Module,
    objective: Objective,
    prompts: Conditioning,
    *,
    steps: int,
    batch_size: int,
    fake: Denoiser | None = None,
    fake_loss: FakeScoreLoss | None = None,
    fake_updates: int = 1,
    lr: float = 1e-4,
    fake_lr: float | None = None,
    adam_betas: tuple[float, float] = (0.0, 0.999),
    weight_decay: float = 0.0,
    grad_clip: float | None = 10.0,
    lr_schedule: str = "constant",
    ema_decay: float = 0.99,
    seed: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> AlignmentResult:
    """Align `generator` by minimising `objective`; the fake score (if it has parameters) trains by `fake_loss`.

    A fake score with no trainable parameters (an exact one, e.g. AffineFakeScore) is used as it is.
    Raises FloatingPointError naming the step if a loss is not finite.
    """
    if steps < 1 or batch_size < 1 or fake_updates < 0:
        raise ValueError(
            f"steps, batch_size must be >= 1 and fake_updates >= 0, got {steps}, {batch_size}, {fake_updates}"
        )
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule: unknown value {lr_schedule!r}; choose 'constant' or 'cosine'")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    gen_params = [p for p in generator.parameters() if p.requires_grad]
    gen_opt = torch.optim.AdamW(gen_params, lr=lr, betas=adam_betas, weight_decay=weight_decay)
    fake_params = [] if fake is None else [p for p in fake.parameters() if p.requires_grad]
    if fake_params and fake_loss is None:
        raise ValueError("the fake score has trainable parameters: pass fake_loss=")
    fake_opt = None
    if fake_params:
        fake_opt = torch.optim.AdamW(fake_params, lr=fake_lr or lr, betas=adam_betas, weight_decay=weight_decay)
    ema = copy.deepcopy(generator).requires_grad_(False)
    result = AlignmentResult(generator, ema)

    for step in range(steps):
        factor = _lr_factor(lr_schedule, step, steps)
        logs: dict[str, float] = {"step": float(step)}
        if fake_opt is not None:
            for group in fake_opt.param_groups:
                group["lr"] = (fake_lr or lr) * factor
            for _ in range(fake_updates):
                z, cond = _draw(generator, prompts, batch_size, rng)
                with torch.no_grad():
                    x0 = generator(z, cond)
                loss, fake_logs = fake_loss(x0, cond, rng)
                fake_opt.zero_grad(set_to_none=True)
                loss.mean().backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(fake_params, grad_clip)
                fake_opt.step()
                logs.update(fake_logs)

        for group in gen_opt.param_groups:
            group["lr"] = lr * factor
        z, cond = _draw(generator, prompts, batch_size, rng)
        loss, gen_logs = objective(generator(z, cond), cond, rng)
        loss = loss.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite generator loss at step {step}")
        gen_opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(gen_params, grad_clip if grad_clip is not None else float("inf"))
        gen_opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), generator.parameters(), strict=True):
                p_ema.lerp_(p, 1 - ema_decay)
        logs.update(gen_logs, loss=loss.item(), grad_norm=norm.item())
        result.history.append(logs)
        if on_step is not None:
            on_step(step, logs)
    return result
