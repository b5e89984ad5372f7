"""One alignment run over several processes (torchrun, gloo, DDP through accelerate) equals one process on the whole
batch: per-step losses and final weights, gradient accumulation, resume at another number of processes, a signal to
one process only, and a process that dies.

Run under torchrun (`torchrun --nproc_per_node N tests/test_distributed.py FOLDER [--accumulation A]
[--signal-rank R --signal-step S] [--die-rank R --die-step S]`), this file is the distributed run: the Gaussian
DIDR run of test_checkpoint_resume, its results written by rank 0 to FOLDER/result.safetensors, exit 75 if preempted.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoint_resume import STEPS, gaussian_run, signal_at, without_times
from torchrun_script import script_results, torchrun

from didr.training.checkpoint import PREEMPTED_EXIT_CODE, Preempted
from didr.training.distributed import check_batch, start_processes

# Measured on this machine (float32, 12 steps): 2 processes, and 2 or 4 micro-batches, differ from one process on
# the whole batch by at most 6e-8 in any weight and 3e-6 relative in any logged number (the order of the sums).
WEIGHT_TOLERANCE, LOG_TOLERANCE = 1e-5, 1e-5


def run_script(folder, nproc, *options, timeout=240):
    return torchrun(__file__, folder, nproc, *options, timeout=timeout)


def results(result, fake):
    """The run's final tensors and its log, as rank 0 writes them."""
    tensors = {f"generator/{n}": p for n, p in result.generator.state_dict().items()}
    tensors |= {f"ema/{n}": p for n, p in result.ema.state_dict().items()}
    return tensors | {f"fake/{n}": p for n, p in fake.state_dict().items()}, without_times(result.history)


def assert_close_runs(tensors_a, history_a, tensors_b, history_b):
    assert tensors_a.keys() == tensors_b.keys()
    for key, a in tensors_a.items():
        torch.testing.assert_close(tensors_b[key], a, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)
    assert len(history_a) == len(history_b) == STEPS
    for row_a, row_b in zip(history_a, history_b, strict=True):
        assert row_a.keys() == row_b.keys()
        for key, value in row_a.items():
            assert row_b[key] == pytest.approx(value, rel=LOG_TOLERANCE, abs=1e-9), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, the whole batch, uninterrupted."""
    return results(*gaussian_run(tmp_path_factory.mktemp("one")))


def test_accumulation_equals_full_batch(tmp_path, one_process):
    """2 and 4 micro-batches of 8 and 4 samples equal one batch of 16 (up to the order of the sums)."""
    for accumulation in (2, 4):
        run = gaussian_run(tmp_path / str(accumulation), accumulation=accumulation)
        assert_close_runs(*one_process, *results(*run))


def test_batch_must_split():
    assert check_batch(16, 2, 4) == 2
    with pytest.raises(ValueError, match=r"align.batch_size 16 does not split over 3 processes x 1 micro-batches"):
        check_batch(16, 3, 1)
    with pytest.raises(ValueError, match=r"--processes and --accumulation must be >= 1, got 1 and 0"):
        check_batch(16, 1, 0)


@pytest.mark.integration
def test_two_processes_preempted_on_one_then_resumed_on_one(tmp_path, one_process):
    """2 processes, SIGUSR1 to rank 1 alone during step 5: both checkpoint after step 6 and exit 75; the run resumed
    by one process ends equal to the uninterrupted one, and the 2-process steps equal it too."""
    done = run_script(tmp_path, 2, "--signal-rank", 1, "--signal-step", 5)
    assert done.returncode != 0, done.stdout + done.stderr
    assert done.stdout.count(" after 6 steps; resume from checkpoint ") == 2, done.stdout + done.stderr[-3000:]
    assert f"exitcode: {PREEMPTED_EXIT_CODE}" in done.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000004.safetensors",
        "step-000006.safetensors",
    ]
    resumed = results(*gaussian_run(tmp_path, resume=True))
    assert_close_runs(*one_process, *resumed)


@pytest.mark.integration
def test_one_process_preempted_then_resumed_on_two(tmp_path, one_process):
    with pytest.raises(Preempted):
        gaussian_run(tmp_path, on_step=signal_at(6))
    done = run_script(tmp_path, 2, "--accumulation", 2)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert_close_runs(*one_process, *script_results(tmp_path))


@pytest.mark.integration
def test_a_dying_process_fails_the_run_naming_its_rank(tmp_path):
    began = time.monotonic()
    done = run_script(tmp_path, 2, "--die-rank", 1, "--die-step", 3, timeout=120)
    assert done.returncode != 0
    assert "rank      : 1" in done.stderr or "rank: 1" in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - began < 100


@pytest.mark.integration
def test_toy_world_stages_on_two_processes(tiny_teacher, tmp_path):
    """`didr warmup` and `didr align --processes 2` (torchrun under the command), LoRA, equal one process with 2
    micro-batches on the toy world: the fake score, the aligned EMA generator and the metric log; a batch that does
    not split stops with one line before any process starts."""
    from didr.cli import main

    params = ["--params", str(tiny_teacher.parent / "params.yaml"), "--teacher", str(tiny_teacher), "--quiet"]
    params += ["--set", "finetune.lora_rank=2"]  # LoRA: the frozen base shared with the teacher, adapters trained
    align = ["align", *params, "--method", "didr", "--strength", "0.5", "--seed", "0"]
    outputs = {}
    for name, options in {"two": ["--processes", "2"], "one": ["--accumulation", "2"]}.items():
        warmup = tmp_path / name / "warmup"
        assert main(["warmup", *params, *options, "--out", str(warmup)]) == 0
        assert main([*align, "--warmup", str(warmup), *options, "--out", str(tmp_path / name / "align")]) == 0
        outputs[name] = tmp_path / name
    for part in ("warmup/fake.safetensors", "align/generator.safetensors", "align/fake.safetensors"):
        one, two = load_file(outputs["one"] / part), load_file(outputs["two"] / part)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=WEIGHT_TOLERANCE, msg=f"{part} {key}")
    logs = [pd.read_parquet(outputs[n] / "align" / "metrics.parquet").drop(columns="step_seconds") for n in outputs]
    pd.testing.assert_frame_equal(logs[1], logs[0], rtol=LOG_TOLERANCE)
    assert (
        main([*align, "--warmup", str(tmp_path / "one" / "warmup"), "--processes", "3", "--out", str(tmp_path / "x")])
        == 2
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.integration
def test_a_signal_to_the_launching_command_checkpoints_every_process(tiny_teacher, tmp_path):
    """SIGTERM to `didr align --processes 2` (as SLURM or Snakemake sends it) reaches both training processes: the run
    checkpoints and exits 75; run again, it resumes and its metric log holds every step exactly once."""
    from didr.cli import main as didr

    params = ["--params", str(tiny_teacher.parent / "params.yaml"), "--teacher", str(tiny_teacher), "--quiet"]
    assert didr(["warmup", *params, "--out", str(tmp_path / "warmup")]) == 0
    command = [
        sys.executable, "-m", "didr.cli", "align", *params, "--warmup", str(tmp_path / "warmup"), "--method", "dmd2",
        "--strength", "1", "--set", "align.steps=40", "--processes", "2", "--checkpoints", str(tmp_path / "ckpt"),
        "--out", str(tmp_path / "align"),
    ]  # fmt: skip
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    launched = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list((tmp_path / "ckpt").rglob("step-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)
    launched.send_signal(signal.SIGTERM)
    _, err = launched.communicate(timeout=180)
    assert launched.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert err.count("preempted by SIGTERM after") == 2, err[-3000:]  # each training process checkpointed
    (stopped,) = {p.parent for p in (tmp_path / "ckpt").rglob("step-*.safetensors")}
    assert not (tmp_path / "align").exists()
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0
    steps = pd.read_parquet(tmp_path / "align" / "metrics.parquet")["step"].tolist()
    assert steps == list(range(40)) and stopped.is_dir()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--signal-rank", type=int, default=-1)
    parser.add_argument("--signal-step", type=int, default=-1)
    parser.add_argument("--die-rank", type=int, default=-1)
    parser.add_argument("--die-step", type=int, default=-1)
    args = parser.parse_args()
    processes = start_processes("cpu")

    def on_step(step, logs):
        if processes.rank == args.signal_rank and step == args.signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        if processes.rank == args.die_rank and step == args.die_step:
            os.kill(os.getpid(), signal.SIGKILL)

    resume = (args.folder / "checkpoints").is_dir()
    try:
        run = gaussian_run(
            args.folder, processes=processes, accumulation=args.accumulation, on_step=on_step, resume=resume
        )
    except Preempted as stop:
        print(f"rank {processes.rank}: {stop}", flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    if processes.main:
        tensors, history = results(*run)
        save_file({k: v.contiguous() for k, v in tensors.items()}, args.folder / "result.safetensors")
        (args.folder / "history.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main()
