"""Sharded training (FSDP2 `fully_shard`, strategy fsdp) equals one process on the whole batch, for full fine-tuning
and for LoRA, and its sharded checkpoints (torch.distributed.checkpoint in safetensors) resume at another number of
processes; a signal to one process checkpoints them all.

Run under torchrun (`torchrun --nproc_per_node N tests/test_sharding.py FOLDER [--lora-first LORA_FOLDER]
[--accumulation A] [--signal-rank R --signal-step S] [--strategy S]`), this file is the sharded run: the Gaussian
DIDR run of test_checkpoint_resume (after its LoRA twin in LORA_FOLDER, in the same processes: one start for both),
resumed when FOLDER holds checkpoints, each run's results gathered whole and written by rank 0 to its folder's
result.safetensors; exit 75 if preempted. Strategy fsdp-teacher shards the frozen reference too.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file
from test_checkpoint_resume import EVERY, SCHEDULE, STEPS, TIMES, never, signal_at, without_times
from torch import nn
from torch.distributed.tensor import DTensor
from torchrun_script import script_results, torchrun

from didr.backbones.gaussian import GaussianDenoiser
from didr.objectives import DIDR, FakeScoreLoss
from didr.rewards.analytic import QuadraticReward
from didr.training.checkpoint import PREEMPTED_EXIT_CODE, CheckpointError, Preempted
from didr.training.distributed import Processes, check_strategy, start_processes
from didr.training.loop import align
from didr.training.sharded_checkpoint import list_sharded_checkpoints

# Measured on this machine (float32, 12 steps, 2 processes, fsdp, full fine-tuning and LoRA, uninterrupted or resumed
# at another number of processes): at most 1.2e-7 from one process on the whole batch in any weight, and 4.6e-5
# relative (7e-9 absolute, on a logged value of 1.6e-4) in any logged number: the order of the sums.
WEIGHT_TOLERANCE, LOG_RELATIVE, LOG_ABSOLUTE = 1e-6, 1e-5, 1e-7


class LoraGenerator(nn.Module):
    """The Gaussian run's affine generator behind a frozen linear layer with a peft LoRA (rank 1): the generator and
    the layer's base weights stay as they are, the adapters train (B starts at zero: the start is the plain run's)."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        dim = generator.sample_shape[0]
        self.inner, self.sample_shape = generator.requires_grad_(False), generator.sample_shape
        self.base = nn.Linear(dim, dim)
        with torch.no_grad():
            self.base.weight.copy_(torch.eye(dim) + 0.1 * torch.arange(dim * dim, dtype=torch.float32).view(dim, dim))
            self.base.bias.zero_()
        self.base.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=["base"]), self)

    def forward(self, z, cond):
        return self.base(self.inner(z, cond))


def sharding_run(folder, lora=False, strategy="fsdp", processes=None, **kwargs):
    """test_checkpoint_resume's Gaussian DIDR run (all objects new: a restart), with a LoRA generator if `lora`, on
    `processes` (default: this one, with `strategy`); its final tensors (gathered whole) and its log."""
    torch.manual_seed(0)
    ref = GaussianDenoiser(torch.linspace(-0.5, 0.5, 2), torch.eye(2) + 0.5 * torch.ones(2, 2), SCHEDULE).frozen()
    generator, fake = ref.make_generator(0.9), ref.trainable_copy()
    generator = LoraGenerator(generator) if lora else generator
    processes = processes or Processes(torch.device("cpu"), strategy=strategy)
    processes.shard_teacher(ref)  # fsdp-teacher: the frozen reference too
    objective = DIDR(ref, fake, QuadraticReward(torch.ones(2), torch.eye(2)), beta=1.0, time_sampling=TIMES)
    settings = dict(
        steps=STEPS, batch_size=16, fake=fake, fake_loss=FakeScoreLoss(fake, TIMES), fake_updates=2, lr=1e-2,
        lr_schedule="cosine", adam_betas=(0.9, 0.99), checkpoint_dir=Path(folder) / "checkpoints",
        checkpoint_every=EVERY, metrics_path=Path(folder) / "metrics.parquet", params={"lora": lora},
    )  # fmt: skip
    result = align(generator, objective, ref.encode_prompts([""]), **(settings | kwargs | {"processes": processes}))
    tensors = {f"generator/{n}": p for n, p in result.generator.state_dict().items()}
    tensors |= {f"ema/{n}": p for n, p in result.ema.state_dict().items()}
    tensors |= {f"fake/{n}": p for n, p in fake.state_dict().items()}
    if processes.world > 1:  # every network sharded: frozen LoRA bases too, and the EMA
        for name, t in tensors.items():
            assert isinstance(t, DTensor) and t.placements[0].is_shard(), name
        teacher_sharded = [isinstance(p, DTensor) and p.placements[0].is_shard() for p in ref.parameters()]
        assert teacher_sharded == [processes.strategy == "fsdp-teacher"] * 2, teacher_sharded  # mean and factor
    full = {k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in processes.full(tensors).items()}
    return full, without_times(result.history)


def run_script(folder, nproc, *options, timeout=120):
    return torchrun(__file__, folder, nproc, *options, timeout=timeout)


def assert_close_runs(run_a, run_b):
    (tensors_a, history_a), (tensors_b, history_b) = run_a, run_b
    assert tensors_a.keys() == tensors_b.keys()
    for key, a in tensors_a.items():
        torch.testing.assert_close(tensors_b[key], a, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)
    assert len(history_a) == len(history_b) == STEPS
    for row_a, row_b in zip(history_a, history_b, strict=True):
        assert row_a.keys() == row_b.keys()
        for key, value in row_a.items():
            assert row_b[key] == pytest.approx(value, rel=LOG_RELATIVE, abs=LOG_ABSOLUTE), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The references: one process, the whole batch, uninterrupted (plain, unsharded checkpoints), full and LoRA."""
    return {lora: sharding_run(tmp_path_factory.mktemp(f"one-{lora}"), lora, "ddp") for lora in (False, True)}


def test_bad_strategies_stop_naming_the_key():
    assert check_strategy("fsdp", 2, 1) == "fsdp" and check_strategy("fsdp", 1, 2) == "fsdp"
    with pytest.raises(ValueError, match=r"--strategy fsdp needs --processes > 1 \(or --accumulation > 1"):
        check_strategy("fsdp", 1, 1)
    with pytest.raises(ValueError, match=r"--strategy: unknown value 'zero3'; choose one of ddp, fsdp, fsdp-teacher$"):
        check_strategy("zero3", 2, 1)


def test_a_damaged_sharded_checkpoint_is_skipped_and_another_runs_is_refused(tmp_path, one_process):
    """One process writing sharded checkpoints (fsdp): stopped after step 7, its newest checkpoint's shard file
    corrupted, the resumed run warns, goes on from step 4 and ends equal to the uninterrupted run; a checkpoint
    folder of another run, or of unsharded (ddp) checkpoints, stops the run before any step."""
    with pytest.raises(Preempted):
        sharding_run(tmp_path, accumulation=2, on_step=signal_at(6))
    newest = tmp_path / "checkpoints" / "step-000007"
    manifest = json.loads((newest / "checkpoint.json").read_text())
    assert manifest["step"] == 7 and manifest["tensors"]["fake_opt/1/exp_avg"] == [[2, 2], "torch.float32"]
    (shard,) = newest.glob("shard-*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=r"skipping checkpoint .*step-000007 fails its checksum"):
        resumed = sharding_run(tmp_path, accumulation=2, resume=True)
    assert_close_runs(one_process[False], resumed)
    with pytest.raises(CheckpointError, match=r"step-000012 is from another run: params differs"):
        sharding_run(tmp_path, lora=True, accumulation=2, resume=True, on_step=never)
    sharding_run(tmp_path / "ddp", strategy="ddp", steps=EVERY)
    with pytest.raises(ValueError, match=r"holds ddp checkpoints \(step-\*.safetensors\): resume with ddp"):
        sharding_run(tmp_path / "ddp", steps=EVERY, resume=True, on_step=never)


@pytest.mark.integration
def test_two_sharded_processes_equal_one_then_preempted_on_one_resume_on_one(tmp_path, one_process):
    """LoRA on 2 sharded processes equals one process; the full run, SIGUSR1 to rank 1 alone during step 5: both
    write their shards of step 6 and exit 75; resumed by one process it ends equal to the uninterrupted run."""
    done = run_script(tmp_path / "full", 2, "--lora-first", tmp_path / "lora", "--signal-rank", 1, "--signal-step", 5)
    assert_close_runs(one_process[True], script_results(tmp_path / "lora"))
    assert [p.name for p in list_sharded_checkpoints(tmp_path / "lora" / "checkpoints")] == [
        "step-000008",
        "step-000012",
    ]
    assert len(list((tmp_path / "lora" / "checkpoints" / "step-000012").glob("shard-*.safetensors"))) == 2
    assert done.stdout.count(" after 6 steps; resume from checkpoint ") == 2, done.stdout + done.stderr[-3000:]
    assert f"exitcode: {PREEMPTED_EXIT_CODE}" in done.stderr
    stopped = list_sharded_checkpoints(tmp_path / "full" / "checkpoints")
    assert [p.name for p in stopped] == ["step-000004", "step-000006"]
    assert not list((tmp_path / "full" / "checkpoints").glob(".*"))  # no temporary folder left
    assert_close_runs(one_process[False], sharding_run(tmp_path / "full", resume=True))


@pytest.mark.integration
def test_one_process_preempted_then_resumed_on_two_sharded(tmp_path, one_process):
    """One process (fsdp, 2 micro-batches: sharded checkpoints) stops after step 7; 2 sharded processes of 2
    micro-batches each (gradients accumulated unsynchronised, then reduce-scattered) resume it."""
    with pytest.raises(Preempted):
        sharding_run(tmp_path, accumulation=2, on_step=signal_at(6))
    assert [p.name for p in list_sharded_checkpoints(tmp_path / "checkpoints")] == ["step-000004", "step-000007"]
    done = run_script(tmp_path, 2, "--accumulation", 2)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert_close_runs(one_process[False], script_results(tmp_path))


@pytest.mark.integration
def test_two_processes_with_the_teacher_sharded_equal_one(tmp_path, one_process):
    """fsdp-teacher: the frozen reference (its mean and Cholesky factor) sharded over 2 processes as well, each
    gathered for its x0 calls; the run equals one process on the whole batch."""
    done = run_script(tmp_path, 2, "--strategy", "fsdp-teacher", timeout=240)  # a loaded machine: 120 s ran out
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert_close_runs(one_process[False], script_results(tmp_path))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--lora-first", type=Path)
    parser.add_argument("--signal-rank", type=int, default=-1)
    parser.add_argument("--signal-step", type=int, default=-1)
    parser.add_argument("--strategy", default="fsdp")
    args = parser.parse_args()
    processes = start_processes("cpu", args.strategy)

    def on_step(step, logs):
        if processes.rank == args.signal_rank and step == args.signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)

    runs = [(args.lora_first, True, None)] if args.lora_first else []
    for folder, lora, hook in [*runs, (args.folder, False, on_step)]:
        resume = (folder / "checkpoints").is_dir()
        try:
            tensors, history = sharding_run(
                folder, lora, processes=processes, accumulation=args.accumulation, on_step=hook, resume=resume
            )
        except Preempted as stop:
            print(f"rank {processes.rank}: {stop}", flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
        if processes.main:
            save_file(tensors, folder / "result.safetensors")
            (folder / "history.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main()
