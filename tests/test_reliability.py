"""Reliability without a pipeline run: locks, thread counts, quoted rule commands, model_index.json checks and the
command line's one-line errors before any work (docs/reliability.md). The runs under faults: test_faults.py."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from snakemake.utils import format as snakemake_format
from transformers import CLIPTextConfig, CLIPTextModel

from didr import jobs
from didr.backbones.loading import PipelineFolderError, load_component, load_denoiser
from didr.cli import main, torch_threads
from didr.config import load_params
from didr.training.lock import LockedError, hold_lock, lock_file

ROOT = Path(__file__).parents[1]
HOLD = "import sys, time; from pathlib import Path; from didr.training.lock import hold_lock\n" + (
    "with hold_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(60)"
)


def test_a_second_writer_stops_at_once_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    out = tmp_path / "runs" / "align"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LockedError) as error, hold_lock(out):
            raise AssertionError("the lock was taken twice")
        message = str(error.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and str(out) in message
        assert "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # a holder killed without any clean-up still releases the lock
        holder.wait(timeout=30)
    with hold_lock(out) as path:
        assert path == lock_file(out) == tmp_path / "runs" / ".align.lock"
        assert path.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    assert not path.exists()  # removed on release


def test_threads_come_from_the_option_then_slurm_then_the_cpu_affinity(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert torch_threads(5) == 5 and torch_threads(None) == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert torch_threads(None) == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2(x2)")
    with pytest.raises(ValueError, match=r"SLURM_CPUS_PER_TASK: expected a positive integer, got '2\(x2\)'"):
        torch_threads(None)
    with pytest.raises(ValueError, match="--threads: must be >= 1"):
        torch_threads(0)


def test_the_cli_sets_torch_threads_before_anything_else(tmp_path, monkeypatch):
    """The stage reads its params (its first work) with the job's threads, and leaves the caller's setting after."""
    import didr.cli

    blocker = tmp_path / "f.txt"
    blocker.write_text("mine")
    seen = []
    load_params = didr.cli._load_params  # observed, not replaced: it records the threads, then does its work
    monkeypatch.setattr(didr.cli, "_load_params", lambda a: seen.append(torch.get_num_threads()) or load_params(a))
    assert main(["warmup", "--threads", "3", "--teacher", str(tmp_path), "--out", str(blocker)]) == 2
    assert seen == [3] and torch.get_num_threads() == 1  # conftest.py's setting, restored


def test_every_job_command_passes_its_threads():
    p = load_params(ROOT / "params.yaml")
    for stage, spec in jobs.STAGES.items():
        command = jobs.jobs(p, stage)[-1].command("params.yaml")
        assert command[command.index("--threads") + 1] == str(spec.resources.threads), stage
        assert "--threads {threads}" in jobs.shell(stage)


HOSTILE = "my params/$(touch PWNED)'x.yaml"


@pytest.mark.parametrize("stage", ["align", "sample", "report"])
def test_rule_commands_quote_every_value(tmp_path, stage):
    """jobs.shell as Snakemake formats it (its own formatter, :q quoting) and bash runs it, with `didr` a script that
    prints its words (a script: the command execs it): a path with a space, a quote or $(...) arrives as one word
    and runs nothing."""
    p = load_params(ROOT / "params.yaml")
    run = jobs.runs(p)[0]
    job = jobs.job(p, stage, run if stage != "report" else None)
    values = {
        "input": types.SimpleNamespace(**job.input),
        "params": types.SimpleNamespace(file=HOSTILE, **{k: jobs.shell_words(v) for k, v in job.params.items()}),
        "output": job.output,
        "threads": job.stage.resources.threads,
        "resources": types.SimpleNamespace(**asdict(job.stage.resources)),
        "log": str(tmp_path / "a log.txt"),
    }
    command = snakemake_format(jobs.shell(stage), **values)
    printer = tmp_path / "bin" / "didr"
    printer.parent.mkdir()
    printer.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    printer.chmod(0o755)
    path = f"{printer.parent}{os.pathsep}{os.environ['PATH']}"
    subprocess.run(["bash", "-c", command], cwd=tmp_path, env={**os.environ, "PATH": path}, check=True)
    words = (tmp_path / "a log.txt").read_text().splitlines()
    assert words == job.command(HOSTILE)[1:]  # the words the launcher runs without a shell
    assert not (tmp_path / "PWNED").exists()


def tiny_text_encoder(folder: Path) -> None:
    config = CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["this", "Zen"], "text_encoder: library 'this' is not allowed"),
        (["os", "system"], "text_encoder: library 'os' is not allowed"),
        (["transformers", "NoSuchModel"], "text_encoder: transformers has no loadable class 'NoSuchModel'"),
        (["transformers"], "text_encoder: expected [library, class], got ['transformers']"),
    ],
)
def test_model_index_names_only_allowed_libraries_and_real_classes(tmp_path, spec, message):
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineFolderError) as error:
        load_component(tmp_path, "text_encoder", spec)
    assert str(error.value) == f"{tmp_path / 'model_index.json'}: {message}" + (
        " (one of ('diffusers', 'transformers'))" if "allowed" in message else ""
    )
    assert "this" not in sys.modules  # never imported, so never run


def test_a_truncated_component_or_malformed_index_names_the_file(tmp_path):
    tiny_text_encoder(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    loaded = load_component(tmp_path, "text_encoder", ["transformers", "CLIPTextModel"])
    assert loaded.config.hidden_size == 8
    weights = tmp_path / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(PipelineFolderError, match=f"^{tmp_path / 'text_encoder'}: cannot load transformers.CLIP"):
        load_component(tmp_path, "text_encoder", ["transformers", "CLIPTextModel"])
    (tmp_path / "model_index.json").write_text('{"unet": ["diffusers", ')
    with pytest.raises(PipelineFolderError, match=f"^{tmp_path / 'model_index.json'}: not valid JSON"):
        load_denoiser(tmp_path)


def test_bad_command_lines_are_one_line_and_exit_2_before_any_work(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params)
    user_file = tmp_path / "f.txt"
    user_file.write_text("mine")
    cases = [
        (["--params", str(tmp_path), "--out", str(tmp_path / "w")], f"{tmp_path}: is a folder, not a params file"),
        (["--params", str(params), "--set", "align.lr=[1", "--out", str(tmp_path / "w")], "--set 'align.lr=[1': the"),
        (["--params", str(params), "--out", str(user_file)], f"--out {user_file}: exists and is not a folder"),
    ]
    for args, message in cases:
        assert main(["warmup", "--teacher", str(tmp_path / "none"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"didr warmup: {message}") and err.count("\n") == 1, err
    assert user_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "params.yaml"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_while_loading_exits_75_in_one_line(tmp_path, capsys, signum):
    """The params file is a FIFO with no writer: the stage blocks reading it (loading) until the signal lands."""
    fifo = tmp_path / "params.yaml"
    os.mkfifo(fifo)
    before = signal.getsignal(signum)  # pytest's own (SIGINT: SIG_IGN where the suite runs as a background job)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signum))
    timer.start()
    try:
        code = main(["warmup", "--params", str(fifo), "--teacher", str(tmp_path), "--out", str(tmp_path / "w")])
    finally:
        timer.join()
    err = capsys.readouterr().err
    assert code == 75
    assert err == f"didr warmup: stopped by {signum.name} before its output was written; rerun the same command\n"
    assert signal.getsignal(signum) == before  # restored


@pytest.mark.integration  # a `didr` process: 5-10 s
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) for a read-only mount")
def test_a_read_only_output_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    mount = f"mount --bind -o ro {folder} {folder} && exec {sys.executable} -m didr.cli warmup"
    args = f"--params {ROOT / 'params.yaml'} --teacher {tmp_path} --out {folder / 'w'}"
    run = subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} {args}"], capture_output=True, text=True, cwd=ROOT)
    if "mount" in run.stderr and "didr" not in run.stderr:
        pytest.skip(f"no read-only bind mount here: {run.stderr.strip()}")
    assert run.returncode == 2
    assert run.stderr == f"didr warmup: --out {folder / 'w'}: cannot write in {folder} (Read-only file system)\n"
