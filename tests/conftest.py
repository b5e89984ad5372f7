"""Suite-wide settings and the session's shared tiny teacher."""

from pathlib import Path

import pytest
import torch
import yaml
from pipeline_project import tiny_params

# One intra-op thread: the suite's tensors are tiny, and on a 2-core machine OpenMP spin-waits made tiny nets
# 10-100x slower under load.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """The teacher stage's output for tests/data/tiny_params.yaml (the toy teacher and toy rewards), made once per
    session by `didr teacher`; that params file (prompt paths absolute) is params.yaml beside it. Tests read it
    and never write into it: a module that needs it in its own folder copies it."""
    from didr.cli import main

    root = tmp_path_factory.mktemp("tiny-teacher")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    assert main(["teacher", "--params", str(root / "params.yaml"), "--out", str(root / "teacher"), "--quiet"]) == 0
    return root / "teacher"
