"""The on-policy RL loop for few-step generators: sample groups, score, advantages, inner epochs over shuffled steps
(docs/algorithm.md §8.5).

Each epoch draws `groups` prompts, samples `method.group_size` trajectories of each without gradients, turns their
rewards into per-(row, transition) advantages with the method (GRPO, SDPO), then runs `inner_epochs` passes: the
groups in shuffled minibatches of `groups_per_update`, and within each minibatch the trained transitions in shuffled
order, one optimiser step per (minibatch, transition). Checkpoints (the align loop's safetensors format, with the
method's state such as SDPO's buffers) are taken between epochs, so a resumed run continues exactly where the
interrupted one stopped without re-sampling earlier epochs; metrics go to the same parquet log, SIGTERM / SIGUSR1
checkpoint and raise Preempted, and `progress` shows a tqdm bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from didr.backbones.base import Conditioning
from didr.fewstep import Policy, Trajectory
from didr.objectives.grpo import Score
from didr.rewards.base import Reward
from didr.training.checkpoint import TrainingState, check_checkpointing, checkpoint_or_stop, resume_from
from didr.training.metrics_log import MetricsLog
from didr.training.preemption import stop_on_signals


class PolicyMethod(Protocol):
    """What the loop asks of a policy-gradient method (didr/objectives/grpo.py GRPO, sdpo.py SDPO)."""

    group_size: int

    def state(self) -> dict[str, Tensor]: ...

    def check(self, generator: Policy) -> None: ...

    def choose_steps(self, transitions: int, rng: torch.Generator) -> list[int]: ...

    def draw(
        self, groups: int, generator: Policy, steps: list[int], rng: torch.Generator, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]: ...

    def advantages(
        self, trajectory: Trajectory, score: Score, prompt_ids: Tensor
    ) -> tuple[Tensor, dict[str, float]]: ...

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, step: int) -> Tensor: ...


@dataclass
class PolicyResult:
    """The trained policy and one dict of logged scalars per epoch."""

    generator: Policy
    history: list[dict[str, float]] = field(default_factory=list)


def rollout(
    generator: Policy, method: PolicyMethod, reward: Reward, prompts: Conditioning, groups: int, rng: torch.Generator
) -> tuple[Trajectory, Conditioning, Tensor, list[int], dict[str, float]]:
    """One epoch's samples: the trajectories, their prompts, advantages [N, K-1], trained steps and logged scalars."""
    dtype = next(generator.parameters()).dtype
    index = torch.randint(len(prompts), (groups,), generator=rng, device=rng.device)
    prompt_ids = index.repeat_interleave(method.group_size)
    cond = prompts.select(prompt_ids)
    steps = method.choose_steps(generator.steps - 1, rng)
    z, noise = method.draw(groups, generator, steps, rng, dtype)
    with torch.no_grad():
        trajectory = generator.sample(z, cond, noise=noise)

        def score(x0: Tensor) -> Tensor:
            return reward(generator.decode(x0), cond.prompts)

        advantages, logs = method.advantages(trajectory, score, prompt_ids)
    return trajectory, cond, advantages, steps, logs


def train_policy(
    generator: Policy,
    method: PolicyMethod,
    reward: Reward,
    prompts: Conditioning,
    *,
    epochs: int,
    groups: int,
    groups_per_update: int | None = None,
    inner_epochs: int = 1,
    lr: float = 1e-4,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    keep_checkpoints: int = 2,
    resume: bool = False,
    params: dict[str, Any] | None = None,
    metrics_path: str | Path | None = None,
    progress: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> PolicyResult:
    """Train `generator` on `reward` by `method` for `epochs` sampling epochs (§8.5).

    Checkpoints every `checkpoint_every` epochs and at the end (with `checkpoint_dir`); `resume=True` continues from
    the newest one, bit-identically on the CPU, if it comes from the same run (method class, `params`, these loop
    settings), else CheckpointError. `on_epoch(epoch, logs)` is called after each epoch's updates. Raises
    FloatingPointError naming the epoch if a loss is not finite.
    """
    groups_per_update = groups_per_update or groups
    if epochs < 1 or groups < 1 or inner_epochs < 1 or not 1 <= groups_per_update <= groups:
        raise ValueError(
            "epochs, groups, inner_epochs must be >= 1 and groups_per_update in [1, groups], got "
            f"{epochs}, {groups}, {inner_epochs}, {groups_per_update}"
        )
    check_checkpointing(checkpoint_dir, checkpoint_every, keep_checkpoints, resume, params)
    method.check(generator)
    trained: dict[str, Tensor] = {n: p for n, p in generator.named_parameters() if p.requires_grad}
    device = next(iter(trained.values())).device
    rng = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(list(trained.values()), lr=lr, betas=adam_betas, weight_decay=weight_decay)
    max_norm = float("inf") if grad_clip is None else grad_clip
    loop = dict(
        epochs=epochs, groups=groups, groups_per_update=groups_per_update, inner_epochs=inner_epochs, lr=lr,
        adam_betas=adam_betas, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed,
    )  # fmt: skip
    state = TrainingState(
        tensors={"generator": trained, "method": method.state()},
        optimizers={"policy_opt": optimizer},
        rng=rng,
        identity={"method": type(method).__name__, "params": params or {}, "loop": loop},
    )
    log = MetricsLog(metrics_path)
    start, last = resume_from(checkpoint_dir, state, resume)  # the newest intact checkpoint, skipping damaged ones
    log.resume(start)
    size = method.group_size
    bar = tqdm(total=epochs, initial=start, desc="policy", file=sys.stderr, disable=not progress)
    with stop_on_signals(enabled=checkpoint_dir is not None) as stop, bar:
        for epoch in range(start, epochs):
            began = time.perf_counter()
            trajectory, cond, advantages, steps, logs = rollout(generator, method, reward, prompts, groups, rng)
            losses, norms = [], []
            for _ in range(inner_epochs):
                for chunk in torch.randperm(groups, generator=rng, device=rng.device).split(groups_per_update):
                    rows = (chunk[:, None] * size + torch.arange(size, device=chunk.device)).flatten()
                    batch_cond, states = cond.select(rows), trajectory.states[rows]
                    for position in torch.randperm(len(steps), generator=rng, device=rng.device).tolist():
                        k = steps[position]
                        log_prob = generator.log_prob(states[:, k], states[:, k + 1], k, batch_cond)
                        old, advantage = trajectory.log_probs[rows, k], advantages[rows, k]
                        loss = method.loss(log_prob, old, advantage, k).mean()
                        if not torch.isfinite(loss):
                            log.flush()
                            raise FloatingPointError(
                                f"non-finite policy loss at epoch {epoch}; last good checkpoint: {last or 'none'}"
                            )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        norms.append(torch.nn.utils.clip_grad_norm_(list(trained.values()), max_norm).item())
                        optimizer.step()
                        losses.append(loss.item())
            logs.update(
                step=float(epoch), loss=sum(losses) / len(losses), grad_norm=sum(norms) / len(norms),
                step_seconds=time.perf_counter() - began,
            )  # fmt: skip
            log.append(logs)
            bar.set_postfix(reward=f"{logs.get('reward', float('nan')):.4g}", refresh=False)
            bar.update()
            if on_epoch is not None:
                on_epoch(epoch, logs)
            done = epoch + 1
            last = checkpoint_or_stop(
                done, epochs, stop.signal_name, checkpoint_dir, checkpoint_every, state, keep_checkpoints, log, last
            )
    log.flush()
    return PolicyResult(generator, log.rows)
