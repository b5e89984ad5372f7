"""The alignment loop: two time-scale updates of the fake score and the one-step generator (docs/algorithm.md §2.2).

One function whose hyper-parameters are keyword arguments (the EDM style). Each step first fits the fake score
`fake_updates` times on fresh detached generator samples, then takes one generator step on the objective, then
updates the EMA of the generator. Optionally it checkpoints (safetensors, atomic), resumes bit-identically on the
CPU, logs every step's scalars to parquet, shows a progress bar and stops cleanly on SIGTERM / SIGUSR1.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from didr.backbones.base import Conditioning, Denoiser
from didr.objectives.fake_score import FakeScoreLoss
from didr.training.checkpoint import Preempted, TrainingState, list_checkpoints, load_checkpoint, save_checkpoint
from didr.training.metrics_log import MetricsLog
from didr.training.preemption import stop_on_signals

Objective = Callable[[Tensor, Conditioning, torch.Generator], tuple[Tensor, dict[str, float]]]


@dataclass
class AlignmentResult:
    """The trained generator, its EMA (the one to sample from), and one dict of logged scalars per step."""

    generator: nn.Module
    ema: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)


def draw_batch(
    generator: nn.Module, prompts: Conditioning, batch_size: int, rng: torch.Generator
) -> tuple[Tensor, Conditioning]:
    """A batch of noise z ~ N(0, I) and prompts drawn with replacement from the prompt set."""
    param = next(generator.parameters())
    index = torch.randint(len(prompts), (batch_size,), generator=rng, device=rng.device)
    shape = cast("tuple[int, ...]", generator.sample_shape)  # every generator declares its sample shape
    z = torch.randn((batch_size, *shape), generator=rng, device=rng.device, dtype=param.dtype)
    return z.to(param.device), prompts.select(index)


def _trained(module: nn.Module | None) -> dict[str, Tensor]:
    """The parameters that train (frozen ones, e.g. a LoRA's base weights, are rebuilt by the caller on resume)."""
    return {} if module is None else {n: p for n, p in module.named_parameters() if p.requires_grad}


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
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 2,
    resume: bool = False,
    params: dict[str, Any] | None = None,
    metrics_path: str | Path | None = None,
    progress: bool = False,
) -> AlignmentResult:
    """Align `generator` by minimising `objective`; the fake score (if it has parameters) trains by `fake_loss`.

    A fake score with no trainable parameters (an exact one, e.g. AffineFakeScore) is used as it is.
    With `checkpoint_dir`, a checkpoint (step-NNNNNN.safetensors, the newest `keep_checkpoints` kept) is written every
    `checkpoint_every` steps and at the end, and SIGTERM / SIGUSR1 make the run finish its step, checkpoint and raise
    Preempted. `resume=True` continues from the newest checkpoint there (bit-identically on the CPU); it must come
    from the same run: objective class, `params` (the caller's JSON-able description of the run) and this loop's
    hyper-parameters, else CheckpointError. `metrics_path`: a parquet file of every step's scalars, flushed at each
    checkpoint; a resumed run reloads its rows into `history` (without it, history starts at the resumed step).
    `progress` shows a tqdm bar on stderr. Raises FloatingPointError naming the step and the last good checkpoint
    if a loss is not finite.
    """
    if steps < 1 or batch_size < 1 or fake_updates < 0:
        raise ValueError(
            f"steps, batch_size must be >= 1 and fake_updates >= 0, got {steps}, {batch_size}, {fake_updates}"
        )
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule: unknown value {lr_schedule!r}; choose 'constant' or 'cosine'")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    if checkpoint_every < 1 or keep_checkpoints < 1:
        raise ValueError(f"checkpoint_every, keep_checkpoints must be >= 1, got {checkpoint_every}, {keep_checkpoints}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    try:
        json.dumps(params)
    except TypeError as error:
        raise ValueError(f"params must be JSON-serialisable: {error}") from error
    max_norm = float("inf") if grad_clip is None else grad_clip
    device = next(generator.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    gen_params = [p for p in generator.parameters() if p.requires_grad]
    gen_opt: torch.optim.Optimizer = torch.optim.AdamW(gen_params, lr=lr, betas=adam_betas, weight_decay=weight_decay)
    fake_params = [] if fake is None else [p for p in fake.parameters() if p.requires_grad]
    if fake_params and fake_loss is None:
        raise ValueError("the fake score has trainable parameters: pass fake_loss=")
    fake_opt: torch.optim.Optimizer | None = None
    if fake_params:
        fake_opt = torch.optim.AdamW(fake_params, lr=fake_lr or lr, betas=adam_betas, weight_decay=weight_decay)
    frozen = {id(p): p for p in generator.parameters() if not p.requires_grad}  # shared, not copied (LoRA bases)
    ema = copy.deepcopy(generator, frozen).requires_grad_(False)
    trained, ema_tensors = _trained(generator), dict(ema.named_parameters())
    loop = dict(
        steps=steps, batch_size=batch_size, fake_updates=fake_updates, lr=lr, fake_lr=fake_lr, adam_betas=adam_betas,
        weight_decay=weight_decay, grad_clip=grad_clip, lr_schedule=lr_schedule, ema_decay=ema_decay, seed=seed,
    )  # fmt: skip
    state = TrainingState(
        tensors={
            "generator": trained,
            "ema": {n: ema_tensors[n] for n in trained},
            "fake": _trained(fake),
        },
        optimizers={"gen_opt": gen_opt} | ({} if fake_opt is None else {"fake_opt": fake_opt}),
        rng=rng,
        identity={"method": type(objective).__name__, "params": params or {}, "loop": loop},
    )
    log = MetricsLog(metrics_path)
    start, last = 0, None
    found = [] if checkpoint_dir is None else list_checkpoints(checkpoint_dir)
    if found and not resume:
        raise ValueError(f"checkpoint_dir {checkpoint_dir} holds checkpoints ({found[-1].name}): pass resume=True")
    if found:
        last = found[-1]
        start = load_checkpoint(last, state)
        log.resume(start)
    result = AlignmentResult(generator, ema, log.rows)

    def save(done: int) -> Path | None:
        """Flush the metric log, then (with checkpoint_dir) checkpoint: the log never lags the newest checkpoint."""
        log.flush()
        return None if checkpoint_dir is None else save_checkpoint(checkpoint_dir, done, state, keep_checkpoints)

    bar = tqdm(total=steps, initial=start, desc="align", file=sys.stderr, disable=not progress)
    with stop_on_signals(enabled=checkpoint_dir is not None) as stop, bar:
        for step in range(start, steps):
            began = time.perf_counter()
            factor = _lr_factor(lr_schedule, step, steps)
            logs: dict[str, float] = {"step": float(step)}
            if fake_opt is not None:
                assert fake_loss is not None  # fake_opt exists only for trainable fake parameters, which need it
                for group in fake_opt.param_groups:
                    group["lr"] = (fake_lr or lr) * factor
                for _ in range(fake_updates):
                    z, cond = draw_batch(generator, prompts, batch_size, rng)
                    with torch.no_grad():
                        x0 = generator(z, cond)
                    loss, fake_logs = fake_loss(x0, cond, rng)
                    fake_opt.zero_grad(set_to_none=True)
                    loss.mean().backward()
                    fake_norm = torch.nn.utils.clip_grad_norm_(fake_params, max_norm)
                    fake_opt.step()
                    logs.update(fake_logs, grad_norm_fake=fake_norm.item())

            for group in gen_opt.param_groups:
                group["lr"] = lr * factor
            z, cond = draw_batch(generator, prompts, batch_size, rng)
            loss, gen_logs = objective(generator(z, cond), cond, rng)
            loss = loss.mean()
            if not torch.isfinite(loss):
                log.flush()
                raise FloatingPointError(
                    f"non-finite generator loss at step {step}; last good checkpoint: {last or 'none'}"
                )
            gen_opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(gen_params, max_norm)
            gen_opt.step()
            with torch.no_grad():  # the trained tensors only: the frozen ones (LoRA bases) are shared with the EMA
                for name, p in trained.items():
                    ema_tensors[name].lerp_(p, 1 - ema_decay)
            logs.update(gen_logs, loss=loss.item(), grad_norm=norm.item(), step_seconds=time.perf_counter() - began)
            log.append(logs)
            bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
            bar.update()
            if on_step is not None:
                on_step(step, logs)
            done = step + 1
            signal_name = stop.signal_name  # read once: a signal arriving after this is handled after the next step
            if done % checkpoint_every == 0 or done == steps or signal_name:
                last = save(done)
            if signal_name:
                raise Preempted(done, last, signal_name)
    return result
