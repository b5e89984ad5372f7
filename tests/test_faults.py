"""Fault injection (integration tier, about a minute on 2 cores): kill -9, SIGTERM, SIGINT and SIGUSR1 at random
moments of a run, each followed by a rerun that must be bit-identical to an uninterrupted run; two racing `didr
align` processes; the bad-input table of docs/reliability.md, each case one line naming the file and exit 2.

The moments are drawn from DIDR_FAULT_SEED (default: a fresh seed, printed in every failure message): rerun a
failure with the seed it names.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import test_checkpoint_resume as resume_tests
import torch
from safetensors import safe_open

from didr.cli import main

pytestmark = pytest.mark.integration
SEED = int(os.environ.get("DIDR_FAULT_SEED", random.SystemRandom().randrange(10**6)))
ROOT = Path(__file__).parents[1]
SIGNALS = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]  # SIGUSR1: test_checkpoint_resume.py


@pytest.fixture(scope="module")
def uninterrupted_gaussian(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result, _ = resume_tests.gaussian_run(folder)
    return folder, result


@pytest.mark.parametrize("case", range(len(SIGNALS)))
def test_a_run_killed_at_a_random_moment_resumes_bit_identically(uninterrupted_gaussian, tmp_path, case):
    """The preemptible child of test_checkpoint_resume.py (a 12-step run, a checkpoint every 4, 0.25 s per step) gets
    the signal at a random step and a random moment of it (inside a checkpoint write, for some), then resumes."""
    rng = random.Random(SEED * 100 + case)
    signum, step, delay = SIGNALS[case], rng.randrange(0, resume_tests.STEPS - 1), rng.uniform(0.0, 0.3)
    where = f"DIDR_FAULT_SEED={SEED}: {signum.name} {delay:.3f} s after step {step}"
    child = subprocess.Popen([sys.executable, resume_tests.__file__, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line == f"step {step}\n":
            break
    subprocess.run(["sleep", f"{delay:.3f}"], check=True)
    child.send_signal(signum)
    child.stdout.read()
    code = child.wait(timeout=60)
    assert code == (-9 if signum == signal.SIGKILL else 75), where
    result, _ = resume_tests.gaussian_run(tmp_path, resume=True)
    resume_tests.assert_same_runs(*uninterrupted_gaussian, tmp_path, result)


@pytest.fixture(scope="module")
def world(tiny_teacher, tmp_path_factory):
    """The tiny teacher (conftest.py), its params file and a warm start, in a folder of this module's own."""
    folder = tmp_path_factory.mktemp("faults")
    shutil.copy2(tiny_teacher.parent / "params.yaml", folder / "params.yaml")
    common = ["--params", str(folder / "params.yaml"), "--threads", "1", "--quiet"]
    assert main(["warmup", *common, "--teacher", str(tiny_teacher), "--out", str(folder / "warmup")]) == 0
    align = ["align", *common, "--teacher", str(tiny_teacher), "--warmup", str(folder / "warmup")]
    return folder, [*align, "--method", "didr", "--strength", "0.5"]


def didr(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "didr.cli", *args], stderr=subprocess.PIPE, text=True, cwd=ROOT)


def assert_same_outputs(a: Path, b: Path) -> None:
    """Bit-identical weights (every tensor), metric logs (but the step times) and params."""
    for name in ("generator.safetensors", "fake.safetensors"):
        with safe_open(a / name, "pt") as fa, safe_open(b / name, "pt") as fb:
            assert sorted(fa.keys()) == sorted(fb.keys())
            for key in fa.keys():  # noqa: SIM118 (not a dict)
                assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), (name, key)
    logs = [pd.read_parquet(folder / "metrics.parquet").drop(columns="step_seconds") for folder in (a, b)]
    pd.testing.assert_frame_equal(*logs, check_exact=True)
    assert (a / "params.json").read_text() == (b / "params.json").read_text()


@pytest.fixture(scope="module")
def raced(world):
    """Two `didr align` processes on one output: the second stops at once naming the first; the first finishes.
    The first is paused (SIGSTOP) once it holds the lock, so that the race has the same outcome on any machine."""
    folder, align = world
    out = folder / "raced"
    first = didr(*align, "--out", str(out))
    lock = folder / ".raced.lock"
    while not (lock.exists() and lock.read_text()):  # the first holds the output's lock
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    second = didr(*align, "--out", str(out))
    try:
        assert second.wait(timeout=120) == 75
        assert f"is being written by another didr process (pid {first.pid} on host " in second.stderr.read()
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    return out


def test_a_cli_run_stopped_at_a_random_moment_reruns_bit_identically(world, raced):
    """SIGTERM, SIGINT or kill -9 at a random moment of `didr align` (importing, loading, training, writing)."""
    folder, align = world
    rng = random.Random(SEED)
    signum, delay = rng.choice([signal.SIGTERM, signal.SIGINT, signal.SIGKILL]), rng.uniform(0.5, 6.0)
    where = f"DIDR_FAULT_SEED={SEED}: {signum.name} {delay:.2f} s into didr align"
    out = folder / "stopped"
    run = didr(*align, "--out", str(out))
    try:
        run.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        run.send_signal(signum)
    code, err = run.wait(timeout=120), run.stderr.read()
    assert code in (0, 75, -9), f"{where}: exit {code}: {err}"
    if code == 75:
        assert err.count("\n") == 1 and "Traceback" not in err, where
    rerun = didr(*align, "--out", str(out))
    assert rerun.wait(timeout=120) == 0, rerun.stderr.read()
    assert_same_outputs(raced, out)
    assert not list(folder.glob(".stopped.*.tmp")), where


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_index(old: str, new: str):
    def edit(path: Path) -> None:
        path.write_text(path.read_text().replace(old, new))

    return edit


BAD_INPUTS = [
    ("truncated teacher", "pipeline/unet/diffusion_pytorch_model.safetensors", truncate, "pipeline/unet: cannot load"),
    ("truncated text encoder", "pipeline/text_encoder/model.safetensors", truncate, "pipeline/text_encoder: cannot"),
    ("truncated embedding shard", "embeddings/train-00000.safetensors", truncate, "train-00000.safetensors: not a"),
    ("truncated reward weights", "rewards/preference/model.safetensors", truncate, "rewards: reward 'toy_preference'"),
    ("unknown class", "pipeline/model_index.json", edit_index("DDIMScheduler", "NoScheduler"), "has no loadable"),
    ("library not allowed", "pipeline/model_index.json", edit_index('"diffusers"', '"this"'), "'this' is not allowed"),
    ("malformed model_index.json", "pipeline/model_index.json", truncate, "model_index.json: not valid JSON"),
]


@pytest.mark.parametrize(("case", "damaged", "damage", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_a_bad_input_is_one_line_naming_the_file(world, tiny_teacher, tmp_path, capsys, case, damaged, damage, message):
    align = world[1]
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    damage(teacher / damaged)
    args = [teacher if a == str(tiny_teacher) else a for a in align]
    assert main([*map(str, args), "--out", str(tmp_path / "out")]) == 2, case
    err = capsys.readouterr().err
    assert err.startswith("didr align: ") and err.count("\n") == 1 and message in err, err
    assert str(teacher) in err, err
    assert not (tmp_path / "out").exists()


FULL_DISK = """
import sys, torch
from pathlib import Path
from didr.training.checkpoint import TrainingState, list_checkpoints, load_latest_checkpoint, save_checkpoint
weights = {"w": torch.ones(300_000)}  # 1.2 MB a checkpoint, on a 2 MB disk: the second does not fit
state = TrainingState({"generator": weights}, {}, torch.Generator(), {"method": "X"})
folder = Path(sys.argv[1])
save_checkpoint(folder, 1, state, keep=1)
try:
    save_checkpoint(folder, 2, state, keep=1)
except OSError as error:
    print(error)
print([p.name for p in folder.iterdir()], load_latest_checkpoint(folder, state)[0])
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) for a small tmpfs")
def test_a_full_disk_is_one_line_and_keeps_the_older_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = f"mount -t tmpfs -o size=2m tmpfs {disk} && exec {sys.executable} -c '{FULL_DISK}' {disk / 'ck'}"
    run = subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0 and "mount" in run.stderr:
        pytest.skip(f"no tmpfs mount here: {run.stderr.strip()}")
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and len(lines) == 2, run.stdout + run.stderr
    assert lines[0].startswith(f"{disk / 'ck' / 'step-000002.safetensors'}: cannot be written (")
    assert "No space left on device" in lines[0]
    assert lines[1] == "['step-000001.safetensors'] 1"  # the older checkpoint intact, no temporary left
