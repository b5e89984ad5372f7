"""The test modules that are also torchrun scripts (tests/test_distributed.py, tests/test_sharding.py): start one
with N CPU processes and read back what its rank 0 wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file


def torchrun(script, folder, nproc, *options, timeout):
    """torchrun `script` with `nproc` processes on the CPU (one thread each); the completed process, output
    captured."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
        str(folder), *map(str, options),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def script_results(folder):
    """The script's final tensors (result.safetensors) and its log (history.json)."""
    return load_file(Path(folder) / "result.safetensors"), json.loads((Path(folder) / "history.json").read_text())
