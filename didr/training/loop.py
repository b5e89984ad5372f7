"""The alignment loop: two time-scale updates of the fake score and the one-step generator (docs/algorithm.md §2.2).

One function whose hyper-parameters are keyword arguments (the EDM style). Each step first fits the fake score
`fake_updates` times on fresh detached generator samples, then takes one generator step on the objective, then
updates the EMA of the generator. Optionally it checkpoints (safetensors, atomic), resumes bit-identically on the
CPU, logs every step's scalars to parquet, shows a progress bar and stops cleanly on SIGTERM / SIGUSR1.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from didr.backbones.base import Conditioning, Denoiser
from didr.diffusion import SlicedGenerator, batch_randint, batch_randn
from didr.objectives.fake_score import FakeScoreLoss
from didr.training.checkpoint import (
    Preempted,
    TrainingState,
    check_checkpointing,
    check_finite,
    checkpoint_path,
    resume_from,
    save_checkpoint,
)
from didr.training.distributed import Processes, check_batch
from didr.training.metrics_log import MetricsLog
from didr.training.preemption import stop_on_signals
from didr.training.sharded_checkpoint import resume_sharded, save_sharded_checkpoint

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
    """A batch of noise z ~ N(0, I) and prompts drawn with replacement from the prompt set (this process's piece of
    the global batch when `rng` is a SlicedGenerator)."""
    param = next(generator.parameters())
    index = batch_randint(len(prompts), batch_size, rng, device=rng.device)
    shape = cast("tuple[int, ...]", generator.sample_shape)  # every generator declares its sample shape
    z = batch_randn((batch_size, *shape), rng, device=rng.device, dtype=param.dtype)
    return z.to(param.device), prompts.select(index)


class FakeStep(nn.Module):
    """The fake score's loss as a module's forward, so that data parallelism can wrap it."""

    def __init__(self, fake: nn.Module, fake_loss: FakeScoreLoss):
        super().__init__()
        self.fake, self.fake_loss = fake, fake_loss

    def forward(self, x0: Tensor, cond: Conditioning, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return self.fake_loss(x0, cond, rng)


def micro_batches(rng: SlicedGenerator, processes: Processes, accumulation: int) -> Iterator[bool]:
    """Point `rng` at each of this process's micro-batches in turn, every one starting from the same state, so that
    together they draw what one process drawing the global batch would; yields whether it is the last."""
    start = rng.get_state()
    for j in range(accumulation):
        rng.set_state(start)
        rng.part = processes.rank * accumulation + j
        yield j == accumulation - 1


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(row[k] for row in rows) / len(rows) for k in rows[0]}


def _trained(module: nn.Module | None) -> dict[str, Tensor]:
    """The parameters that train (frozen ones, e.g. a LoRA's base weights, are rebuilt by the caller on resume)."""
    return {} if module is None else {n: p for n, p in module.named_parameters() if p.requires_grad}


def clip_gradients(params: Sequence[Tensor], max_norm: float, elements: int = 1) -> tuple[Tensor, dict[str, float]]:
    """Clip the gradient of a loss summed over `elements` per sample as DMD2 clips its per-element mean, at
    max_norm * elements (docs/algorithm.md §4.5). Returns the pre-clip norm and, on the per-element-mean scale,
    the norms before and after clipping and whether it acted."""
    threshold = max_norm * elements
    norm = torch.nn.utils.clip_grad_norm_(params, threshold)
    applied = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm, {
        "grad_norm_mean_scale": norm.item() / elements,
        "grad_norm_applied_mean_scale": applied.item() / elements,
        "grad_clipped": float(norm.item() > threshold),
    }


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
    accumulation: int = 1,
    processes: Processes | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    snapshot_at: Sequence[int] = (),
    on_snapshot: Callable[[int, nn.Module], None] | None = None,
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
    `grad_clip` is DMD2's max_grad_norm, on the scale of a loss averaged over a sample's elements: the objectives sum
    over them, so the generator's gradient is clipped at grad_clip x elements, the fake score's (a mean) at grad_clip;
    each step logs the norms before and after and whether clipping acted (docs/algorithm.md §4.5).
    `batch_size` is the global batch: with `processes` (several, started by torchrun) and `accumulation`
    micro-batches, each process computes batch_size / (world x accumulation) samples at a time, and the run's
    losses and weights equal one process's on the whole batch up to the order of floating-point sums.
    With `checkpoint_dir`, a checkpoint (step-NNNNNN.safetensors, the newest `keep_checkpoints` kept) is written every
    `checkpoint_every` steps and at the end, and SIGTERM / SIGUSR1 (on any process) make the run finish its step,
    checkpoint and raise Preempted. `resume=True` continues from the newest checkpoint there (bit-identically on the
    CPU, at any number of processes); it must come from the same run: objective class, `params` (the caller's
    JSON-able description of the run) and this loop's hyper-parameters, else CheckpointError. `metrics_path`: a
    parquet file of every step's scalars, flushed at each checkpoint; a resumed run reloads its rows into `history`
    (without it, history starts at the resumed step). Only the main process writes files. `progress` shows a tqdm
    bar on stderr. `on_snapshot(step, ema)` is called on every process after each step in `snapshot_at` (counted
    from 1), before that step's checkpoint, so a run resumed from any later checkpoint has had every earlier call.
    Raises FloatingPointError naming the step and the last verified checkpoint if the loss, the gradient
    norm or a trained parameter is not finite; a damaged newest checkpoint is skipped for the newest intact one.
    """
    if steps < 1 or batch_size < 1 or fake_updates < 0:
        raise ValueError(
            f"steps, batch_size must be >= 1 and fake_updates >= 0, got {steps}, {batch_size}, {fake_updates}"
        )
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule: unknown value {lr_schedule!r}; choose 'constant' or 'cosine'")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    check_checkpointing(checkpoint_dir, checkpoint_every, keep_checkpoints, resume, params)
    if snapshot_at and (on_snapshot is None or not all(1 <= k <= steps for k in snapshot_at)):
        raise ValueError(f"snapshot_at: needs on_snapshot and steps in [1, {steps}], got {list(snapshot_at)}")
    device = next(generator.parameters()).device
    processes = processes or Processes(device)
    micro = check_batch(batch_size, processes.world, accumulation)
    max_norm = float("inf") if grad_clip is None else grad_clip
    elements = math.prod(cast("tuple[int, ...]", generator.sample_shape))  # the generator loss sums over these
    rng = SlicedGenerator(device, parts=processes.world * accumulation)
    rng.manual_seed(seed)
    frozen = {id(p): p for p in generator.parameters() if not p.requires_grad}  # shared, not copied (LoRA bases)
    ema = processes.shard(copy.deepcopy(generator, frozen).requires_grad_(False))  # copied before any sharding
    wrapped = processes.wrap(processes.shard(generator))  # fsdp: sharded in place, before its optimiser is made
    if fake is not None:
        processes.shard(fake)
    gen_params = [p for p in generator.parameters() if p.requires_grad]
    gen_opt: torch.optim.Optimizer = torch.optim.AdamW(gen_params, lr=lr, betas=adam_betas, weight_decay=weight_decay)
    fake_params = [] if fake is None else [p for p in fake.parameters() if p.requires_grad]
    if fake_params and fake_loss is None:
        raise ValueError("the fake score has trainable parameters: pass fake_loss=")
    fake_opt: torch.optim.Optimizer | None = None
    fake_step: nn.Module | None = None
    if fake_params:
        assert fake is not None and fake_loss is not None  # fake_params come from a fake score, which needs its loss
        fake_opt = torch.optim.AdamW(fake_params, lr=fake_lr or lr, betas=adam_betas, weight_decay=weight_decay)
        fake_step = processes.wrap(FakeStep(fake, fake_loss))
    trained, ema_tensors = _trained(generator), dict(ema.named_parameters())
    watched = {f"generator/{n}": p for n, p in trained.items()} | {f"fake/{n}": p for n, p in _trained(fake).items()}
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
    log = MetricsLog(metrics_path if processes.main else None)
    if processes.sharded:  # the newest intact checkpoint, skipping damaged ones
        start, last = resume_sharded(checkpoint_dir, state, resume, processes)
    else:
        start, last = resume_from(checkpoint_dir, state, resume)
    log.resume(start)
    processes.barrier()  # every process has read the checkpoint before the main one may write the next
    result = AlignmentResult(generator, ema, log.rows)

    def save(done: int) -> Path | None:
        """Flush the metric log, then (with checkpoint_dir) checkpoint: the log never lags the newest checkpoint."""
        if processes.main:
            log.flush()
        if checkpoint_dir is None:
            processes.barrier()
            return None
        if processes.sharded:  # every process writes its shards
            return save_sharded_checkpoint(checkpoint_dir, done, state, keep_checkpoints, processes)
        if processes.main:
            save_checkpoint(checkpoint_dir, done, state, keep_checkpoints)
        processes.barrier()
        return checkpoint_path(checkpoint_dir, done)

    bar = tqdm(total=steps, initial=start, desc="align", file=sys.stderr, disable=not (progress and processes.main))
    with stop_on_signals(enabled=checkpoint_dir is not None) as stop, bar:
        for step in range(start, steps):
            began = time.perf_counter()
            factor = _lr_factor(lr_schedule, step, steps)
            logs: dict[str, float] = {"step": float(step)}
            if fake_opt is not None:
                assert fake_step is not None  # made with fake_opt
                for group in fake_opt.param_groups:
                    group["lr"] = (fake_lr or lr) * factor
                for _ in range(fake_updates):
                    fake_opt.zero_grad(set_to_none=True)
                    rows = []
                    for last_micro in micro_batches(rng, processes, accumulation):
                        z, cond = draw_batch(generator, prompts, micro, rng)
                        with torch.no_grad():
                            x0 = generator(z, cond)
                        with processes.accumulating(fake_step, sync=last_micro):
                            loss, fake_logs = fake_step(x0, cond, rng)
                            (loss.mean() / accumulation).backward()
                        rows.append(fake_logs)
                    fake_norm, fake_clipping = clip_gradients(fake_params, max_norm)  # its loss is a mean already
                    fake_opt.step()
                    logs.update(_mean(rows), grad_norm_fake=fake_norm.item())
                    logs.update(grad_clipped_fake=fake_clipping["grad_clipped"])

            for group in gen_opt.param_groups:
                group["lr"] = lr * factor
            gen_opt.zero_grad(set_to_none=True)
            rows, total = [], 0.0
            for last_micro in micro_batches(rng, processes, accumulation):
                z, cond = draw_batch(generator, prompts, micro, rng)
                with processes.accumulating(wrapped, sync=last_micro):
                    loss, gen_logs = objective(wrapped(z, cond), cond, rng)
                    loss = loss.mean() / accumulation
                    loss.backward()
                rows.append(gen_logs)
                total += loss.item()
            logs = processes.mean(logs | _mean(rows) | {"loss": total})
            norm, clipping = clip_gradients(gen_params, max_norm, elements)
            gen_opt.step()
            with torch.no_grad():  # the trained tensors only: the frozen ones (LoRA bases) are shared with the EMA
                for name, p in trained.items():
                    ema_tensors[name].lerp_(p, 1 - ema_decay)
            try:  # the same numbers on every process (losses all-reduced, gradients averaged): all stop together
                check_finite(step, logs["loss"], norm, watched, last)
            except FloatingPointError:
                if processes.main:
                    log.flush()
                raise
            logs.update(clipping, grad_norm=norm.item(), step_seconds=time.perf_counter() - began)
            log.append(logs)
            bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
            bar.update()
            if on_step is not None:
                on_step(step, logs)
            done = step + 1
            if done in snapshot_at:
                assert on_snapshot is not None  # checked with snapshot_at
                on_snapshot(done, ema)
            signal_name = stop.signal_name  # read once: a signal arriving after this is handled after the next step
            stopping = processes.any(signal_name is not None)  # a signal to any process stops them all at this step
            if done % checkpoint_every == 0 or done == steps or stopping:
                last = save(done)
            if stopping:
                raise Preempted(done, last, signal_name or "a signal to another process")
    return result
