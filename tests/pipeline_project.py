"""A scratch copy of the pipeline's files (as a fresh clone has them) with a tiny params file, for the tests that
run Snakemake, SLURM or DVC on the real workflow; the suite's one tiny params file (tests/data/tiny_params.yaml)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
TINY = Path(__file__).parent / "data"
PIPELINE_FILES = ["Snakefile", "workflow", "slurm", "profiles", "presets", "dvc.yaml", ".dvcignore"]
TINY_PARAMS = TINY / "tiny_params.yaml"
BIN = Path(sys.executable).parent  # the venv's snakemake, dvc and didr


def tiny_params(**sections: dict) -> dict:
    """tests/data/tiny_params.yaml with its prompt files as absolute paths (for stages run outside a scratch
    project), each keyword updating that section: tiny_params(rewards={"eval": [...]})."""
    params = yaml.safe_load(TINY_PARAMS.read_text())
    params["prompts"] = {split: str(TINY / Path(path).name) for split, path in params["prompts"].items()}
    for name, update in sections.items():
        params[name] = {**params.get(name, {}), **update}
    return params


def scratch_project(folder: Path, params: Path = TINY_PARAMS) -> Path:
    """`folder` with the Snakefile, workflow/, the slurm and workflow profiles, presets, dvc.yaml, the repository's
    prompt files and the tiny params and prompt files (params.yaml is the tiny one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name)
        elif source.is_file():
            shutil.copy2(source, folder / name)
    shutil.copy2(params, folder / "params.yaml")
    prompts = folder / "data" / "prompts"
    shutil.copytree(ROOT / "data" / "prompts", prompts)
    for name in ("tiny_train.txt", "tiny_eval.txt"):
        shutil.copy2(TINY / name, prompts / name)
    return folder


def environment() -> dict[str, str]:
    """The test process's environment with the venv's commands first on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def snakemake(folder: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the venv's snakemake in `folder` (output captured, never hanging past `timeout`)."""
    return subprocess.run(
        [str(BIN / "snakemake"), *args], cwd=folder, env=environment(), capture_output=True, text=True, timeout=timeout
    )


def planned_jobs(folder: Path, *args: str) -> dict[str, int]:
    """Jobs per rule that a dry run of `snakemake all` plans (empty when nothing is to be done)."""
    result = snakemake(folder, "all", "--dry-run", "--quiet", "rules", *args)
    assert result.returncode == 0, result.stderr + result.stdout
    text = result.stdout + result.stderr
    table = text.split("Job stats:")[1].split("total")[0] if "Job stats:" in text else ""
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.MULTILINE)}
