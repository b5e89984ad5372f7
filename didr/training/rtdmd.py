"""The AC-DMD / RTDMD loop for a few-step flow generator (docs/algorithm.md §8.7).

Stage-1 step (AC-DMD, §8.2): `fake_updates` fake-score steps, then one generator step, each on a fresh batch
stopped at a random step k (`stop_state`: x_s the state after transition k at s = t_{k+1}, or the image at s = 0
when k = K - 1), then the EMA. Stage-2 step (RTDMD, §8.7): one SubGRPO rollout of `groups` prompts (§8.3, §8.5);
`fake_updates` fake-score steps on the rollout's states at random stop steps; then `inner_epochs` passes over the
rollout, each one generator step on the sum of the trained transitions' PPO losses (ratios against the rollout's
log-densities, so from the second pass on the clip acts) and the last-step loss (AC-DMD plus the reward hinge) on the
deterministic last prediction from the rollout's last state, each followed by the EMA. RTDMD's code accumulates a
pass's steps into one optimiser step, so their order within a pass does not matter. Checkpoints, the metric log,
stop signals and resume are the align loop's (didr/training/checkpoint.py): a resumed run is bit-identical on the CPU.
One process.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from didr.backbones.base import Conditioning, Denoiser
from didr.fewstep import FewStepGenerator, Trajectory
from didr.objectives.rtdmd import RTDMD
from didr.training.checkpoint import (
    TrainingState,
    check_checkpointing,
    check_finite,
    checkpoint_or_stop,
    resume_from,
)
from didr.training.loop import AlignmentResult, draw_batch
from didr.training.metrics_log import MetricsLog
from didr.training.preemption import stop_on_signals
from didr.training.rl import rollout


def check_generator(generator: FewStepGenerator, method: RTDMD) -> None:
    """ValueError naming the key: AC-DMD steps back with the generator's CPS transition at its eta; stage 2 needs
    stochastic transitions."""
    if generator.steps > 1 and (generator.sampler != "cps" or generator.eta != method.acdmd.eta):
        raise ValueError(
            f"warmup.generator.sampler: acdmd / rtdmd need the 'cps' sampler at the AC-DMD eta {method.acdmd.eta}, "
            f"got {generator.sampler!r} at eta {generator.eta}"
        )
    if method.grpo is not None:
        method.grpo.check(generator)


def stop_state(
    generator: FewStepGenerator, z: Tensor, cond: Conditioning, rng: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(x_s, s) at a uniformly drawn stop step k in [0, K - 1] (§8.2; gradients through the last prediction only)."""
    stop = int(torch.randint(generator.steps, (1,), generator=rng, device=rng.device))
    return generator.state_after(z, cond, stop, rng)


def rollout_state(trajectory: Trajectory, stop: int) -> tuple[Tensor, Tensor]:
    """(x_s, s) of a rollout at stop step k: the state after transition k at s = t_{k+1}, or the image at s = 0."""
    rows = trajectory.states.shape[0]
    if stop == trajectory.transitions:
        return trajectory.image, trajectory.image.new_zeros(rows)
    return trajectory.states[:, stop + 1], trajectory.times[stop + 1].expand(rows)


def acdmd_fake_loss(
    generator: FewStepGenerator, method: RTDMD, prompts: Conditioning, batch_size: int, rng: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """The fake score's AC-DMD loss (§8.2) on a fresh batch's state x_s at a random stop step (no generator
    gradients)."""
    z, cond = draw_batch(generator, prompts, batch_size, rng)
    with torch.no_grad():
        x_s, s = stop_state(generator, z, cond, rng)
    return method.acdmd.fake_loss(x_s, s, cond, rng)


def acdmd_generator_loss(
    generator: FewStepGenerator, method: RTDMD, prompts: Conditioning, batch_size: int, rng: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """The generator's AC-DMD loss (§8.2) on a fresh batch's state x_s at a random stop step."""
    z, cond = draw_batch(generator, prompts, batch_size, rng)
    x_s, s = stop_state(generator, z, cond, rng)
    return method.acdmd.generator_loss(x_s, s, cond, rng)


def train_rtdmd(
    generator: FewStepGenerator,
    fake: Denoiser,
    method: RTDMD,
    prompts: Conditioning,
    *,
    steps: int,
    batch_size: int,
    groups: int = 1,
    inner_epochs: int = 1,
    fake_updates: int = 1,
    lr: float = 1e-4,
    stage_two_lr: float | None = None,
    fake_lr: float | None = None,
    adam_betas: tuple[float, float] = (0.0, 0.999),
    weight_decay: float = 0.0,
    grad_clip: float | None = 10.0,
    ema_decay: float = 0.99,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 2,
    resume: bool = False,
    params: dict[str, Any] | None = None,
    metrics_path: str | Path | None = None,
    progress: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> AlignmentResult:
    """Train `generator` and the fake score by `method` for `steps` steps: stage 1 on batches of `batch_size` at
    `lr`, stage 2 on rollouts of `groups` prompts x group_size at `stage_two_lr` (default `lr`), `inner_epochs`
    generator steps per rollout (align.policy.inner_epochs, as the policy loop). Checkpoints, resume,
    signals and FloatingPointError as `didr.training.loop.align`. Returns the generator, its EMA and the logs."""
    if min(steps, batch_size, groups, inner_epochs, fake_updates) < 1:
        raise ValueError(
            "steps, batch_size, groups, inner_epochs, fake_updates must be >= 1, got "
            f"{steps}, {batch_size}, {groups}, {inner_epochs}, {fake_updates}"
        )
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    check_checkpointing(checkpoint_dir, checkpoint_every, keep_checkpoints, resume, params)
    check_generator(generator, method)
    trained: dict[str, Tensor] = {n: p for n, p in generator.named_parameters() if p.requires_grad}
    fake_trained: dict[str, Tensor] = {n: p for n, p in fake.named_parameters() if p.requires_grad}
    if not fake_trained:
        raise ValueError("acdmd / rtdmd train the fake score: it has no trainable parameters")
    device = next(iter(trained.values())).device
    rng = torch.Generator(device=device).manual_seed(seed)
    gen_opt = torch.optim.AdamW(list(trained.values()), lr=lr, betas=adam_betas, weight_decay=weight_decay)
    fake_opt = torch.optim.AdamW(
        list(fake_trained.values()), lr=fake_lr or lr, betas=adam_betas, weight_decay=weight_decay
    )
    max_norm = float("inf") if grad_clip is None else grad_clip
    frozen = {id(p): p for p in generator.parameters() if not p.requires_grad}  # shared with the EMA (LoRA bases)
    ema = copy.deepcopy(generator, frozen).requires_grad_(False)
    ema_tensors = dict(ema.named_parameters())
    loop = dict(
        steps=steps, batch_size=batch_size, groups=groups, inner_epochs=inner_epochs, fake_updates=fake_updates, lr=lr,
        stage_two_lr=stage_two_lr, fake_lr=fake_lr,
        adam_betas=adam_betas, weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay, seed=seed,
    )  # fmt: skip
    state = TrainingState(
        tensors={"generator": trained, "ema": {n: ema_tensors[n] for n in trained}, "fake": fake_trained},
        optimizers={"gen_opt": gen_opt, "fake_opt": fake_opt},
        rng=rng,
        identity={"method": type(method).__name__, "params": params or {}, "loop": loop},
    )
    log = MetricsLog(metrics_path)
    start, last = resume_from(checkpoint_dir, state, resume)
    log.resume(start)
    watched = {f"generator/{n}": p for n, p in trained.items()} | {f"fake/{n}": p for n, p in fake_trained.items()}

    def fake_step(loss: Tensor, logs: dict[str, float]) -> dict[str, float]:
        fake_opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(list(fake_trained.values()), max_norm)
        fake_opt.step()
        return logs | {"grad_norm_fake": norm.item()}

    def generator_step(step: int, loss: Tensor) -> dict[str, float]:
        """One optimiser step of the generator on `loss`, then the EMA; FloatingPointError if not finite."""
        gen_opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(trained.values()), max_norm)
        gen_opt.step()
        with torch.no_grad():
            for name, p in trained.items():
                ema_tensors[name].lerp_(p, 1 - ema_decay)
        try:
            check_finite(step, loss.item(), norm, watched, last)
        except FloatingPointError:
            log.flush()
            raise
        return {"loss": loss.item(), "grad_norm": norm.item()}

    def stage_one(step: int) -> dict[str, float]:
        for _ in range(fake_updates):
            logs = fake_step(*acdmd_fake_loss(generator, method, prompts, batch_size, rng))
        loss, gen_logs = acdmd_generator_loss(generator, method, prompts, batch_size, rng)
        return logs | gen_logs | generator_step(step, loss.mean())

    def stage_two(step: int) -> dict[str, float]:
        """The rollout, the fake updates, then `inner_epochs` generator steps on it; loss, loss_policy and grad_norm
        are the passes' means, the other logs the last pass's."""
        assert method.grpo is not None and method.reward is not None  # stage 2 only exists with both
        trajectory, cond, advantages, trained_steps, logs = rollout(
            generator, method.grpo, method.reward, prompts, groups, rng
        )  # fmt: skip
        for _ in range(fake_updates):
            stop = int(torch.randint(generator.steps, (1,), generator=rng, device=rng.device))
            x_s, s = rollout_state(trajectory, stop)
            logs |= fake_step(*method.acdmd.fake_loss(x_s, s, cond, rng))
        last_step, passes = generator.steps - 1, []
        for _ in range(inner_epochs):
            policy = trajectory.image.new_zeros(())
            for k in trained_steps:
                log_prob = generator.log_prob(trajectory.states[:, k], trajectory.states[:, k + 1], k, cond)
                policy = policy + method.grpo.loss(log_prob, trajectory.log_probs[:, k], advantages[:, k], k).mean()
            x0 = generator.predict(trajectory.states[:, last_step], last_step, cond)
            last_loss, last_logs = method.last_step_loss(x0, cond, rng)
            logs |= last_logs
            passes.append({"loss_policy": policy.item()} | generator_step(step, policy + last_loss.mean()))
        return logs | {key: sum(p[key] for p in passes) / len(passes) for key in passes[0]}

    bar = tqdm(total=steps, initial=start, desc="rtdmd", file=sys.stderr, disable=not progress)
    with stop_on_signals(enabled=checkpoint_dir is not None) as stop, bar:
        for step in range(start, steps):
            began = time.perf_counter()
            stage = method.stage(step)
            for group in gen_opt.param_groups:
                group["lr"] = lr if stage == 1 or stage_two_lr is None else stage_two_lr
            logs = stage_one(step) if stage == 1 else stage_two(step)
            logs |= {"step": float(step), "stage": float(stage), "step_seconds": time.perf_counter() - began}
            log.append(logs)
            bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
            bar.update()
            if on_step is not None:
                on_step(step, logs)
            done = step + 1
            last = checkpoint_or_stop(
                done, steps, stop.signal_name, checkpoint_dir, checkpoint_every, state, keep_checkpoints, log, last
            )
    log.flush()
    return AlignmentResult(generator, ema, log.rows)
