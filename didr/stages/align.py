"""Stage `align`: one method at one strength, from the warm start; resumable, preemption-safe."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from hashlib import file_digest, sha256
from pathlib import Path

from torch import nn

from didr.backbones.tuning import checkpoint_frozen_parts
from didr.config import Params
from didr.diffusion import UniformTime
from didr.fewstep import FewStepGenerator
from didr.grid import Run
from didr.methods import build_objective, build_policy_method, build_rtdmd_method, get_method
from didr.objectives.fake_score import FakeScoreLoss
from didr.stages.common import (
    generator_record,
    load_fake,
    load_generator,
    load_prompts,
    load_reward,
    load_teacher,
    read_run_params,
)
from didr.stages.io import trained_state, write_text_atomic
from didr.training.atomic import atomic_dir, save_tensors
from didr.training.distributed import Processes, start_processes
from didr.training.loop import align
from didr.training.rl import train_policy
from didr.training.rtdmd import train_rtdmd

SNAPSHOTS = "snapshots"  # the EMA generators at align.evaluate_at, in the checkpoint folder and in the output


def run_align(
    params: Params,
    teacher_dir: Path,
    warmup_dir: Path,
    out: Path,
    run: Run,
    checkpoint_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    accumulation: int = 1,
    strategy: str = "ddp",
) -> None:
    """out/generator.safetensors (the EMA), out/fake.safetensors, out/metrics.parquet, out/params.json, written
    together when the run ends. Checkpoints go to `checkpoint_dir` (default out/../<name>.checkpoints), outside the
    output so that a scheduler that clears a failed job's output never loses them, in a sub-folder named by a digest
    of what the run trains with: a rerun with the same settings resumes from the latest checkpoint, a rerun after
    a change starts afresh, and only what the run trains with is checked against a checkpoint (an edit elsewhere in
    the params file, such as another run added to the grid, does not stop a retried run from resuming). `run` names
    the method, its strength and the seed; `params.align` already carries the run's overrides. Under torchrun each
    process computes its share of the batch in `accumulation` micro-batches (`strategy`: ddp, or fsdp sharding the
    generator and the fake score over the processes), and the main process writes. For each step N of
    align.evaluate_at, out/snapshots/step=N/ holds the EMA after step N (generator.safetensors, params.json with
    `step`), kept in the checkpoint folder from step N on, so a resumed run writes the same files."""
    processes = start_processes(device, strategy)
    dev = processes.device
    teacher = load_teacher(teacher_dir, dev)
    if params.finetune.gradient_checkpointing:
        checkpoint_frozen_parts(teacher)
    reward = load_reward(params.rewards.train, teacher_dir, dev, params.rewards.models.get(params.rewards.train))
    generator, fake = load_generator(teacher, warmup_dir).train(), load_fake(teacher, warmup_dir)
    processes.shard_teacher(teacher)  # fsdp-teacher: its network sharded too, after the copies that share it (LoRA)
    a = params.align
    method, strength, seed = run.method, run.strength, run.seed
    loop = get_method(method).loop
    policy = loop != "align"
    if policy and processes.world > 1:
        raise ValueError(f"{method}: runs on one process only (--processes 1)")
    record = {
        "stage": "align", "method": method, "strength": strength, "seed": seed, "run": run.id,
        "setting": run.setting, "params": asdict(params), "generator": generator_record(generator),
        "processes": processes.world, "accumulation": accumulation, "strategy": strategy,
    }  # fmt: skip
    kept = {k: v for k, v in asdict(a).items() if k != "evaluate_at" or v}  # runs without it resume as before
    identity = {
        "align": kept, "finetune": asdict(params.finetune), "reward": params.rewards.train,
        "reward_options": params.rewards.models.get(params.rewards.train), "run": run.id,
        "teacher": read_run_params(teacher_dir)["params"]["teacher"],
        "warm_start": {name: _file_digest(warmup_dir / name) for name in ("generator.safetensors", "fake.safetensors")},
    }  # fmt: skip
    digest = sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    checkpoint_dir = (checkpoint_dir or out.with_name(out.name + ".checkpoints")) / digest
    prompts = load_prompts(teacher_dir, "train", dev)
    if not policy:
        objective = build_objective(method, strength, teacher, fake, reward, a, params.finetune.gradient_checkpointing)
        trained: nn.Module = align(
            generator, objective, prompts, steps=a.steps, batch_size=a.batch_size,
            fake=fake, fake_loss=FakeScoreLoss(fake, UniformTime(a.t_min, a.t_max_sampling)),
            fake_updates=a.fake_updates, lr=a.lr, fake_lr=a.fake_lr, grad_clip=a.grad_clip, ema_decay=a.ema_decay,
            seed=seed, checkpoint_dir=checkpoint_dir, checkpoint_every=a.checkpoint_every,
            metrics_path=checkpoint_dir / "metrics.parquet", params=identity, resume=True, progress=progress,
            processes=processes, accumulation=accumulation, snapshot_at=a.evaluate_at,
            on_snapshot=lambda step, ema: _save_snapshot(ema, processes, checkpoint_dir / SNAPSHOTS, step),
        ).ema  # fmt: skip
    elif not isinstance(generator, FewStepGenerator):  # the policy and rtdmd loops train K-step samplers
        raise ValueError(f"warmup.generator.steps: {method} needs a few-step generator (steps >= 2), got 1")
    elif loop == "rtdmd":  # AC-DMD, then RTDMD's stage 2 (§8.7): the fake score trains at intermediate states
        rtdmd = build_rtdmd_method(method, strength, teacher, fake, reward, a, generator.eta)
        trained = train_rtdmd(
            generator, fake, rtdmd, prompts, steps=a.steps, batch_size=a.batch_size, groups=a.policy.groups,
            inner_epochs=a.policy.inner_epochs, fake_updates=a.fake_updates, lr=a.lr,
            stage_two_lr=a.rtdmd.stage_two_lr, fake_lr=a.fake_lr,
            grad_clip=a.grad_clip, ema_decay=a.ema_decay, seed=seed, checkpoint_dir=checkpoint_dir,
            checkpoint_every=a.checkpoint_every, metrics_path=checkpoint_dir / "metrics.parquet", params=identity,
            resume=True, progress=progress,
        ).ema  # fmt: skip
    else:  # the on-policy loop (§8.5) trains the generator's stochastic transitions; the fake stays as warmed
        train_policy(  # in place: the policy has no EMA
            generator, build_policy_method(method, a.policy, len(prompts), generator.steps - 1), reward, prompts,
            epochs=a.steps, groups=a.policy.groups, groups_per_update=a.policy.groups_per_update,
            inner_epochs=a.policy.inner_epochs, lr=a.lr, grad_clip=a.grad_clip, seed=seed,
            checkpoint_dir=checkpoint_dir, checkpoint_every=a.checkpoint_every, params=identity, resume=True,
            metrics_path=checkpoint_dir / "metrics.parquet", progress=progress,
        )  # fmt: skip
        trained = generator
    weights = {"generator": trained_state(trained), "fake": trained_state(fake)}
    weights = {name: processes.full(state) for name, state in weights.items()}  # fsdp: every process gathers
    if not processes.main:
        return
    with atomic_dir(out) as tmp:
        for name, state in weights.items():
            save_tensors({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / f"{name}.safetensors")
        shutil.copy2(checkpoint_dir / "metrics.parquet", tmp / "metrics.parquet")
        write_text_atomic(tmp / "params.json", json.dumps(record, indent=1))
        for step in a.evaluate_at:  # each written at its step, before any later checkpoint a resumed run started from
            snapshot = tmp / SNAPSHOTS / f"step={step}"
            snapshot.mkdir(parents=True)
            shutil.copy2(checkpoint_dir / SNAPSHOTS / f"step={step}" / "generator.safetensors", snapshot)
            write_text_atomic(snapshot / "params.json", json.dumps(record | {"step": step}, indent=1))


def _save_snapshot(ema: nn.Module, processes: Processes, folder: Path, step: int) -> None:
    """The EMA generator after `step` as folder/step=<step>/generator.safetensors, the final generator's format
    (called on every process: fsdp gathers the shards; the main process writes)."""
    state = processes.full(trained_state(ema))
    if processes.main:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_tensors(tensors, folder / f"step={step}" / "generator.safetensors")


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes (the warm start's weights: a retrained teacher or warm-up is another run)."""
    with path.open("rb") as f:
        return file_digest(f, "sha256").hexdigest()
