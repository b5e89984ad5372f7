"""Preemption-safe, resumable alignment: checkpoints, bit-identical resume, bad checkpoints, the metric log, signals.

Run as a script (`python tests/test_checkpoint_resume.py FOLDER`), this file is the preemptible child process of
test_sigterm_checkpoints_and_exits_75: the Gaussian run below, mapping Preempted to exit code 75 as a CLI does.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from didr.backbones.gaussian import GaussianDenoiser
from didr.diffusion import UniformTime, VPSchedule, cosine_vp_config
from didr.generator import OneStepGenerator
from didr.objectives import DI, DIDR, FakeScoreLoss
from didr.rewards.analytic import QuadraticReward
from didr.training.checkpoint import (
    PREEMPTED_EXIT_CODE,
    CheckpointError,
    DamagedCheckpointError,
    Preempted,
    TrainingState,
    check_finite,
    checkpoint_path,
    checksum,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from didr.training.loop import align
from didr.training.preemption import Interrupted, raise_on_signals

SCHEDULE = VPSchedule.from_scheduler_config(cosine_vp_config())
TIMES = UniformTime(0.02, 0.98)
STEPS, EVERY = 12, 4


def gaussian_run(folder, method="didr", dim=2, wrap=None, **kwargs):
    """DIDR (or DI) on an analytic Gaussian with a learned fake score, all objects new: a restart of the process."""
    torch.manual_seed(0)  # as a fresh process seeds its global RNG (the checkpoint holds that generator's state too)
    cov = torch.eye(dim) + 0.5 * torch.ones(dim, dim)
    ref = GaussianDenoiser(torch.linspace(-0.5, 0.5, dim), cov, SCHEDULE).frozen()
    generator, fake = ref.make_generator(0.9), ref.trainable_copy()
    if method == "didr":
        objective = DIDR(ref, fake, QuadraticReward(torch.ones(dim), torch.eye(dim)), beta=1.0, time_sampling=TIMES)
    else:
        objective = DI(ref, fake, TIMES)
    settings = dict(
        steps=STEPS, batch_size=16, fake=fake, fake_loss=FakeScoreLoss(fake, TIMES), fake_updates=2, lr=1e-2,
        lr_schedule="cosine", adam_betas=(0.9, 0.99), checkpoint_dir=Path(folder) / "checkpoints",
        checkpoint_every=EVERY, metrics_path=Path(folder) / "metrics.parquet", params={"reward": "quadratic"},
    )  # fmt: skip
    objective = objective if wrap is None else wrap(objective)
    return align(generator, objective, ref.encode_prompts([""]), **(settings | kwargs)), fake


def checkpoint(folder, step):
    return Path(folder) / "checkpoints" / f"step-{step:06d}.safetensors"


def signal_at(step, signum=signal.SIGUSR1):
    """An on_step hook that sends this process `signum` during step `step`."""

    def hook(s, logs):
        if s == step:
            os.kill(os.getpid(), signum)

    return hook


def never(step, logs):
    raise AssertionError(f"a training step ran: {step}")


def without_times(rows):
    return [{k: v for k, v in row.items() if k != "step_seconds"} for row in rows]


def assert_same_runs(folder_a, result_a, folder_b, result_b, steps=STEPS):
    """Equal weights, EMA, history and metric log (all but step times), and equal final checkpoints: every tensor
    (generator, EMA, fake score, both optimisers' states, the RNGs) and the metadata."""
    for module_a, module_b in [(result_a.generator, result_b.generator), (result_a.ema, result_b.ema)]:
        for (name, ta), tb in zip(module_a.state_dict().items(), module_b.state_dict().values(), strict=True):
            assert torch.equal(ta, tb), name
    assert without_times(result_a.history) == without_times(result_b.history)
    assert [row["step"] for row in result_b.history] == list(range(steps))
    logs = [pd.read_parquet(Path(f) / "metrics.parquet").drop(columns="step_seconds") for f in (folder_a, folder_b)]
    pd.testing.assert_frame_equal(*logs, check_exact=True)
    with safe_open(checkpoint(folder_a, steps), "pt") as fa, safe_open(checkpoint(folder_b, steps), "pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert set(fa.keys()) == set(fb.keys())
        for key in fa.keys():  # noqa: SIM118 (not a dict)
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result, fake = gaussian_run(folder)
    return folder, result, fake


def test_checkpoints_are_safetensors_written_every_few_steps_and_pruned(uninterrupted):
    folder = uninterrupted[0]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        f"step-{STEPS - EVERY:06d}.safetensors",
        f"step-{STEPS:06d}.safetensors",
    ]
    with safe_open(checkpoint(folder, STEPS), "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert metadata["step"] == str(STEPS) and metadata["method"] == '"DIDR"'
    assert '"reward": "quadratic"' in metadata["params"] and '"betas": [0.9, 0.99]' in metadata["gen_opt"]
    assert {"generator/weight", "ema/bias", "fake/factor", "gen_opt/0/exp_avg", "fake_opt/1/exp_avg_sq"} <= keys
    assert {"rng/sampling", "rng/torch"} <= keys
    log = pd.read_parquet(folder / "metrics.parquet")
    assert log["step"].tolist() == list(range(STEPS))
    assert {"loss", "loss_fake", "grad_norm", "grad_norm_fake", "drs_norm", "step_seconds"} <= set(log.columns)


def test_resume_after_preemption_is_bit_identical(uninterrupted, tmp_path):
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted) as stop:
        gaussian_run(tmp_path, on_step=signal_at(STEPS // 2 - 1))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers
    assert stop.value.step == STEPS // 2 and stop.value.checkpoint == checkpoint(tmp_path, STEPS // 2)
    assert "SIGUSR1" in str(stop.value) and stop.value.checkpoint.exists()
    assert pd.read_parquet(tmp_path / "metrics.parquet")["step"].tolist() == list(range(STEPS // 2))
    result, _ = gaussian_run(tmp_path, resume=True)
    assert_same_runs(uninterrupted[0], uninterrupted[1], tmp_path, result)


def test_a_log_ahead_of_the_newest_checkpoint_is_cut_back_on_resume(uninterrupted, tmp_path):
    """A crash between flushing the log and writing the checkpoint leaves the log ahead: no step repeats."""
    gaussian_run(tmp_path)
    checkpoint(tmp_path, STEPS).unlink()
    result, _ = gaussian_run(tmp_path, resume=True)
    assert_same_runs(uninterrupted[0], uninterrupted[1], tmp_path, result)


def test_a_finished_run_resumes_to_its_final_state(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted[0], tmp_path, dirs_exist_ok=True)
    result, fake = gaussian_run(tmp_path, resume=True, on_step=never)
    assert_same_runs(uninterrupted[0], uninterrupted[1], tmp_path, result)
    assert torch.equal(fake.factor, uninterrupted[2].factor)


def test_existing_checkpoints_need_resume(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted[0], tmp_path, dirs_exist_ok=True)
    with pytest.raises(ValueError, match="resume=True"):
        gaussian_run(tmp_path, on_step=never)


def test_params_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="params must be JSON-serialisable"):
        gaussian_run(tmp_path, params={"teacher": tmp_path}, on_step=never)


def test_sigterm_checkpoints_and_exits_75(uninterrupted, tmp_path):
    child = subprocess.Popen([sys.executable, __file__, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line == "step 2\n":
            child.send_signal(signal.SIGTERM)
            break
    last = child.stdout.read().splitlines()[-1]
    assert child.wait(timeout=60) == PREEMPTED_EXIT_CODE
    _, step, path = last.split()
    assert 3 <= int(step) < STEPS and Path(path) == checkpoint(tmp_path, int(step)) and Path(path).exists()
    result, _ = gaussian_run(tmp_path, resume=True)
    assert_same_runs(uninterrupted[0], uninterrupted[1], tmp_path, result)


def nan_from(step):
    """Wraps an objective so that its loss is NaN from step `step` on (one call per step)."""

    def wrap(objective):
        calls = iter(range(STEPS))

        def exploding(x0, cond, rng):
            loss, logs = objective(x0, cond, rng)
            return loss * (float("nan") if next(calls) >= step else 1.0), logs

        return exploding

    return wrap


def test_a_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(
        FloatingPointError, match=re.escape(f"step 6; last good checkpoint: {checkpoint(tmp_path, EVERY)}")
    ):
        gaussian_run(tmp_path, wrap=nan_from(6))
    assert pd.read_parquet(tmp_path / "metrics.parquet")["step"].tolist() == list(range(6))
    with pytest.raises(FloatingPointError, match=r"step 0; last good checkpoint: none$"):
        gaussian_run(tmp_path, wrap=nan_from(0), checkpoint_dir=None)


def test_progress_bar_on_stderr(tmp_path, capsys):
    gaussian_run(tmp_path, steps=2, progress=True)
    err = capsys.readouterr().err
    assert "align" in err and "2/2" in err and "loss=" in err


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("written_by", "damage", "message"),
    [
        (dict(method="di"), None, "method differs: 'DI' in the file, 'DIDR' in this run"),
        (dict(params={"reward": "linear"}), None, "params differs: reward='linear' in the file, 'quadratic' in"),
        (dict(lr=0.5), None, "loop differs: lr=0.5 in the file, 0.01 in this run"),
        (dict(dim=3), None, r"generator/weight is \[3, 3\] torch.float32 in the file, \[2, 2\] torch.float32 in"),
        ({}, corrupt, "unreadable"),
        ({}, truncate, "unreadable"),
    ],
)
def test_a_bad_checkpoint_fails_with_one_line_naming_the_file(tmp_path, written_by, damage, message):
    gaussian_run(tmp_path, **({"steps": EVERY} | written_by))
    if damage is not None:
        damage(checkpoint(tmp_path, EVERY))
    with pytest.raises(CheckpointError, match=message) as error:
        gaussian_run(tmp_path, steps=EVERY, resume=True, on_step=never)
    assert str(checkpoint(tmp_path, EVERY)) in str(error.value) and "\n" not in str(error.value)


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def test_resume_through_a_diffusers_unet_is_bit_identical(tmp_path):
    from tiny_models import save_sd  # here, so that the preemptible child process does not import diffusers

    from didr.backbones.loading import load_denoiser

    save_sd(tmp_path / "sd")
    teacher = load_denoiser(tmp_path / "sd").frozen()

    def run(folder, **kwargs):
        torch.manual_seed(0)
        generator, fake = OneStepGenerator.from_teacher(teacher, t_star=0.9), teacher.trainable_copy()
        return align(
            generator, DIDR(teacher, fake, brightness, beta=0.5), teacher.encode_prompts(["a red cat", "two dogs"]),
            steps=2, batch_size=2, fake=fake, fake_loss=FakeScoreLoss(fake), lr=1e-3, checkpoint_every=1,
            checkpoint_dir=folder / "checkpoints", metrics_path=folder / "metrics.parquet", **kwargs,
        )  # fmt: skip

    whole = run(tmp_path / "whole")
    with pytest.raises(Preempted):
        run(tmp_path / "parts", on_step=signal_at(0))
    resumed = run(tmp_path / "parts", resume=True)
    assert_same_runs(tmp_path / "whole", whole, tmp_path / "parts", resumed, steps=2)


def small_state(seed, identity=None):
    """A TrainingState of a 3x2 linear layer after one AdamW step: weights, EMA, optimiser moments, both RNGs."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(2, 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 2)).square().mean().backward()
    optimizer.step()
    ema = {n: p.detach().clone() for n, p in net.named_parameters()}
    tensors = {"generator": dict(net.named_parameters()), "ema": ema}
    rng = torch.Generator().manual_seed(seed)
    return TrainingState(tensors, {"gen_opt": optimizer}, rng, identity or {"method": "DIDR", "params": {"b": 1}})


def flip(path, key, offset=0, count=1, bits=0x01):
    """XOR `bits` into `count` bytes of tensor `key`'s data in a safetensors file, `offset` bytes into it."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    begin = 8 + size + json.loads(data[8 : 8 + size])[key]["data_offsets"][0] + offset
    for i in range(begin, begin + count):
        data[i] ^= bits
    path.write_bytes(bytes(data))


@pytest.fixture
def two_checkpoints(tmp_path):
    """Checkpoints of step 1 (seed 1's state) and step 2 (seed 2's), as a run writes them."""
    save_checkpoint(tmp_path, 1, small_state(1), keep=2)
    save_checkpoint(tmp_path, 2, small_state(2), keep=2)
    return tmp_path


def weights(state):
    return {f"{part}/{n}": t.detach().clone() for part, ts in state.tensors.items() for n, t in ts.items()}


def test_checkpoints_carry_a_checksum_of_metadata_and_tensors(two_checkpoints):
    path = checkpoint_path(two_checkpoints, 2)
    with safe_open(path, "pt") as f:
        metadata, flat = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    assert metadata["sha256"] == checksum(flat, metadata) and len(metadata["sha256"]) == 64
    flat["generator/bias"] = flat["generator/bias"] + 2.0**-20  # one ulp-sized change: another checksum
    assert checksum(flat, metadata) != metadata["sha256"]
    assert checksum(flat, metadata | {"step": "3"}) != checksum(flat, metadata)
    state = small_state(9)
    assert load_checkpoint(path, state) == 2
    assert all(torch.equal(t, weights(small_state(2))[k]) for k, t in weights(state).items())


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda path: flip(path, "generator/weight", offset=5, bits=0x10), "fails its checksum"),  # one bit
        (lambda path: flip(path, "gen_opt/0/exp_avg", count=16, bits=0xFF), "fails its checksum"),  # 16 bytes
        (truncate, "unreadable"),
    ],
    ids=["bit-in-weights", "bytes-in-optimiser", "truncated"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one_with_a_warning(two_checkpoints, damage, reason):
    newest = checkpoint_path(two_checkpoints, 2)
    damage(newest)
    state = small_state(9)
    before = weights(state)
    with pytest.raises(DamagedCheckpointError, match=reason):
        load_checkpoint(newest, state)
    assert all(torch.equal(t, before[k]) for k, t in weights(state).items())  # nothing loaded from a damaged file
    with pytest.warns(RuntimeWarning, match=rf"skipping checkpoint {re.escape(str(newest))} .*{reason}") as caught:
        step, path = load_latest_checkpoint(two_checkpoints, state)
    assert (step, path) == (1, checkpoint_path(two_checkpoints, 1)) and len(caught) == 1
    assert all(torch.equal(t, weights(small_state(1))[k]) for k, t in weights(state).items())
    assert torch.equal(state.rng.get_state(), torch.Generator().manual_seed(1).get_state())


def test_no_intact_checkpoint_is_one_line_and_a_foreign_one_is_never_skipped(two_checkpoints, tmp_path_factory):
    for step in (1, 2):
        truncate(checkpoint_path(two_checkpoints, step))
    with pytest.warns(RuntimeWarning), pytest.raises(DamagedCheckpointError) as error:
        load_latest_checkpoint(two_checkpoints, small_state(9))
    message = str(error.value)
    assert "no intact checkpoint" in message and "step-000001" in message and "\n" not in message
    other = tmp_path_factory.mktemp("other")
    save_checkpoint(other, 1, small_state(1, {"method": "DI", "params": {"b": 1}}), keep=2)
    with pytest.raises(CheckpointError, match="method differs"):
        load_latest_checkpoint(other, small_state(9))
    assert load_latest_checkpoint(tmp_path_factory.mktemp("empty"), small_state(9)) == (0, None)


def test_a_checkpoint_with_non_finite_values_is_damaged(tmp_path):
    state = small_state(1)
    with torch.no_grad():
        state.tensors["ema"]["bias"][1] = float("inf")  # written by a run that had already diverged
    save_checkpoint(tmp_path, 1, state, keep=2)
    with pytest.raises(DamagedCheckpointError, match="non-finite values in ema/bias"):
        load_checkpoint(checkpoint_path(tmp_path, 1), small_state(9))


def test_check_finite_names_the_culprit_the_step_and_the_last_verified_checkpoint(tmp_path):
    params = {"generator/weight": torch.ones(2, 2), "fake/bias": torch.zeros(3)}
    last = tmp_path / "step-000004.safetensors"
    check_finite(5, torch.tensor(0.5), torch.tensor(3.0), params, last)  # all finite: nothing raised
    cases = [
        (torch.tensor(float("nan")), 3.0, params, "non-finite generator loss at step 5"),
        (torch.tensor(0.5), float("inf"), params, "non-finite gradient norm at step 5"),
        (0.5, 3.0, params | {"fake/bias": torch.tensor([0.0, float("-inf"), 0.0])}, "parameter fake/bias at step 5"),
    ]
    for loss, norm, tensors, message in cases:
        with pytest.raises(FloatingPointError, match=re.escape(f"{message}; last good checkpoint: {last}")):
            check_finite(5, loss, norm, tensors, last)
    with pytest.raises(FloatingPointError, match=r"last good checkpoint: none$"):
        check_finite(0, float("nan"), 1.0, {}, None)


def test_saving_removes_what_a_killed_writer_left(two_checkpoints):
    stale = two_checkpoints / ".step-000005.safetensors.tmp"  # killed writing step 5; the rerun saves step 3
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(two_checkpoints, 3, small_state(3), keep=2)
    assert sorted(p.name for p in two_checkpoints.iterdir()) == ["step-000002.safetensors", "step-000003.safetensors"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_checkpoints_are_as_readable_as_the_umask_allows(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path, 1, small_state(1), keep=1)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


if __name__ == "__main__":
    torch.set_num_threads(1)  # as conftest.py sets it for the parent's uninterrupted run: the same bits

    def report(step, logs):
        print(f"step {step}", flush=True)
        time.sleep(0.25)

    try:
        gaussian_run(sys.argv[1], on_step=report)
    except Preempted as stop:
        print(f"preempted {stop.step} {stop.checkpoint}", flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


def test_a_stop_signal_while_reading_a_checkpoint_stops_the_command_and_never_condemns_the_file(tmp_path):
    """Under the command line's raise_on_signals, SIGUSR1 from another process at random moments of a checkpoint
    read (2000 tensors) ends as Interrupted, never as DamagedCheckpointError for an intact file: safetensors turns the
    handler's Interrupted into ValueError('could not determine the shape ...')."""
    tensors = {f"layer{i}": torch.randn(32, 32) for i in range(2000)}
    state = TrainingState({"generator": tensors}, {}, torch.Generator().manual_seed(0), {"run": "signals"})
    save_checkpoint(tmp_path, 1, state, keep=1)
    started = time.perf_counter()
    assert load_latest_checkpoint(tmp_path, state)[0] == 1
    read_seconds = time.perf_counter() - started
    rng, command = random.Random(0), "sleep {:.4f}; kill -USR1 {}"
    for _ in range(30):
        with pytest.raises(Interrupted, match="SIGUSR1"), raise_on_signals():
            sender = subprocess.Popen(["sh", "-c", command.format(rng.uniform(0, read_seconds), os.getpid())])
            while sender.poll() is None:
                load_latest_checkpoint(tmp_path, state)
