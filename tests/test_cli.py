"""The `didr` command line: the demo writes its table and its parameters, and bad input fails cleanly."""

import json
import signal
import subprocess
import sys

import pytest

from didr.cli import main


def test_demo_writes_table_and_params(tmp_path, capsys):
    out = tmp_path / "study.md"
    args = ["demo", "--steps", "150", "--schedules", "flow", "--betas", "1.0", "--t-max", "0.6", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[5/5] flow t<=0.6 beta=1.0 dipp" in printed  # one progress line per run
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["params"]["steps"] == 150
    rows = {row["method"]: row for row in record["rows"]}
    assert set(rows) == {"didr-exact", "didr-tweedie", "didr-k-step", "didr-hybrid", "dipp"}
    assert rows["didr-exact"]["mean_error"] < rows["didr-tweedie"]["mean_error"]
    assert "| flow | [0.02, 0.6] | 1.0 | didr-exact |" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.json", "study.md"]  # no temporary files left


def test_unknown_schedule_is_rejected_before_any_work(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "didr.cli", "demo", "--schedules", "ve", "--out", str(tmp_path / "x.md")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "--schedules" in run.stderr and "'ve'" in run.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_in_the_interpreters_teardown_leaves_the_commands_exit_status(tmp_path, signum):
    """The `didr` program once main has returned (here: bad params, exit 2): an exit hook that sends the process a
    stop signal and waits would otherwise end it by the signal (-15, -2) or print a KeyboardInterrupt traceback."""
    hook = f"atexit.register(lambda: (os.kill(os.getpid(), {int(signum)}), time.sleep(0.5)))"
    params = tmp_path / "missing.yaml"
    argv = ["didr", "warmup", "--params", str(params), "--out", str(tmp_path / "out"), "--teacher", str(tmp_path)]
    script = f"import atexit, os, sys, time; {hook}; sys.argv = {argv!r}; from didr.cli import program; program()"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and str(params) in run.stderr
