"""DVC mirrors the Snakemake DAG: the committed dvc.yaml is generated from params.yaml, each stage is its Snakemake
job (name, command, dependencies, outputs, params). On the tiny DAG, reproduced once by `dvc repro`: a
param change stales exactly its dependants, metrics / params / plots read back, an auditor's clone pulls from a
remote and regenerates a byte-identical report, and Snakemake takes over DVC-restored outputs without rerunning."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
from pipeline_project import ROOT, environment, scratch_project

from didr.dvc_pipeline import render
from didr.jobs import STAGES

pytestmark = pytest.mark.integration  # DVC and Snakemake run the tiny DAG in subprocesses

RUNS = ["method=didr/beta=0.5/seed=0", "method=dipp/alpha=2/seed=0"]  # tests/data/tiny_params.yaml's grid
SETS = ["teacher", "warm-start", *RUNS]
DOWNSTREAM_OF_SAMPLE = {f"{stage}@{name}" for stage in ("sample", "score") for name in SETS} | {"report"}
DOWNSTREAM_OF_SAMPLE |= {f"export@{run}" for run in RUNS}  # an export reads its run's scores (the model card)
ENV = {
    **environment(),
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.org",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.org",
}
JOB = re.compile(r"^rule (\w+):\n((?:    .+\n)+)(?:Shell command: (.+)\n)?", re.MULTILINE)


def run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """A command (venv first on PATH) run in `folder`; it must succeed."""
    result = subprocess.run(args, cwd=folder, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def dvc_json(folder: Path, *args: str) -> dict:
    return json.loads(run(folder, "dvc", *args, "--json").stdout)


def snakemake_jobs(folder: Path, *args: str) -> dict[str, dict]:
    """The jobs `snakemake -n all` plans, named like DVC stages (rule@wildcard): shell command without its log
    redirection, input and output paths."""
    result = run(folder, "snakemake", "all", "--dry-run", "--printshellcmds", "--cores", "2", *args)  # the threads
    jobs = {}
    for rule, block, shell in JOB.findall(result.stdout + result.stderr):
        fields = dict(line.strip().split(": ", 1) for line in block.splitlines())
        wildcard = fields.get("wildcards", "").partition("=")[2]
        if rule != "all":
            jobs[f"{rule}@{wildcard}" if wildcard else rule] = {
                "cmd": " ".join(re.sub(r"^exec | > \S+ 2>&1$", "", shell).split()),
                "deps": set(fields["input"].split(", ")),
                "outs": set(fields["output"].split(", ")),
            }
    return jobs


def would_run(folder: Path) -> set[str]:
    """The stages `dvc repro` would run: the changed ones and everything downstream of them."""
    text = run(folder, "dvc", "repro", "--dry", "--force-downstream").stdout
    return set(re.findall(r"^Running stage '(.+)':$", text, re.MULTILINE))


def holder(path: str, folders: set[str]) -> str | None:
    """The one of `folders` that is `path` or holds it (the report stage's output holds the rule's 7 files)."""
    return next((folder for folder in folders if f"{path}/".startswith(f"{folder}/")), None)


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def edit_params(folder: Path, old: str, new: str) -> str:
    """Replace `old` by `new` in folder/params.yaml; the original text."""
    original = (folder / "params.yaml").read_text()
    assert old in original
    (folder / "params.yaml").write_text(original.replace(old, new))
    return original


def test_committed_dvc_yaml_is_generated_from_params(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert (ROOT / "dvc.yaml").read_text() == render("params.yaml"), "run: python -m didr.dvc_pipeline"


def test_each_stage_is_its_snakemake_job_on_a_mixed_grid(tmp_path):
    folder = scratch_project(tmp_path / "p")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    methods = {"didr": {"beta": [0.5], "drs": ["tweedie", "hybrid"]}, "dipp": {"alpha": [2]}, "di": {}}
    params["grid"] = {"seeds": [0, 1], "methods": methods}  # 8 runs: override axis, no strength axis for di
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    run(folder, sys.executable, "-m", "didr.dvc_pipeline", "--params", "params.yaml", "--out", "dvc.yaml")
    run(folder, "dvc", "init", "--no-scm", "-q")
    with Repo(str(folder)) as repo:
        stages = {
            stage.name: {
                "cmd": " ".join(stage.cmd.split()),
                "deps": {dep.def_path for dep in stage.deps if not isinstance(dep, ParamsDependency)},
                "outs": {out.def_path for out in stage.outs},
            }
            for stage in repo.index.stages
        }
    jobs = snakemake_jobs(folder, "--forceall")
    assert len(jobs) == 1 + 1 + 8 + 10 + 10 + 1 + 8  # ... report, an export per run
    assert "align@method=didr/beta=0.5/drs=hybrid/seed=1" in jobs
    assert sorted(stages) == sorted(jobs)
    for name, job in jobs.items():
        assert stages[name]["cmd"] == job["cmd"], name
        assert stages[name]["deps"] == job["deps"], name
        assert {holder(path, stages[name]["outs"]) for path in job["outs"]} == stages[name]["outs"], name


def test_a_preset_is_the_params_file_of_every_stage(tmp_path):
    folder = scratch_project(tmp_path / "p")
    preset = "presets/embedded-sweep.yaml"
    run(folder, sys.executable, "-m", "didr.dvc_pipeline", "--params", preset, "--out", "dvc.yaml")
    run(folder, "dvc", "init", "--no-scm", "-q")
    with Repo(str(folder)) as repo:
        stages = repo.index.stages
        assert len(stages) == 1 + 1 + 39 + 41 + 41 + 1 + 39  # ... report, an export per run
        for stage in stages:
            assert f"--params {preset} " in stage.cmd
            params = [(dep.def_path, dep.params) for dep in stage.deps if isinstance(dep, ParamsDependency)]
            written = [key for key in STAGES[stage.name.partition("@")[0]].reads if key != "rewards.models"]
            assert params == [(preset, written)], stage.name  # the preset writes out every key but rewards.models


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny DAG reproduced by `dvc repro` in a scratch git repository (a fresh clone's files and .gitignore),
    with its lock and DVC's .gitignore committed."""
    folder = scratch_project(tmp_path_factory.mktemp("dvc") / "project")
    shutil.copy2(ROOT / ".gitignore", folder / ".gitignore")
    run(folder, sys.executable, "-m", "didr.dvc_pipeline", "--params", "params.yaml", "--out", "dvc.yaml")
    run(folder, "git", "init", "-q")
    run(folder, "dvc", "init", "-q")
    run(folder, "git", "add", "-A")
    run(folder, "git", "commit", "-qm", "pipeline")
    run(folder, "dvc", "repro")
    run(folder, "git", "add", "-A")
    run(folder, "git", "commit", "-qm", "dvc repro")
    return folder


def test_repro_is_up_to_date_and_keeps_outputs_out_of_git(project):
    assert dvc_json(project, "status") == {}
    tracked = run(project, "git", "ls-files").stdout.split()
    assert {"dvc.lock", "reports/.gitignore"} <= set(tracked)
    assert not [path for path in tracked if path.startswith(("runs/", "reports/tiny"))]
    assert (project / "reports" / ".gitignore").read_text() == "/tiny\n"


def test_a_param_change_stales_exactly_its_dependants(project):
    original = edit_params(project, "per_prompt: 2", "per_prompt: 3")
    try:
        assert set(dvc_json(project, "status")) == {f"sample@{name}" for name in SETS}  # the readers of sample.*
        assert would_run(project) == DOWNSTREAM_OF_SAMPLE  # not teacher, warmup, align@...
        diff = {"params.yaml": {"sample.per_prompt": {"old": 2, "new": 3, "diff": 1}}}
        assert dvc_json(project, "params", "diff") == diff
    finally:
        (project / "params.yaml").write_text(original)


def test_metrics_and_plots_read_the_report(project):
    metrics = dvc_json(project, "metrics", "show")[""]["data"]["reports/tiny/metrics.json"]["data"]
    labels = [
        "didr/beta=0.5/seed=0",
        "dipp/alpha=2/seed=0",
        "one-step (warm start)/t_star=0.9",
        "teacher/steps=3,cfg=3.0",
    ]
    assert sorted(metrics) == labels
    assert all({"fid_real", "toy_preference_mean", "toy_utility_mean"} <= set(row) for row in metrics.values())
    plots = dvc_json(project, "plots", "show")["data"]
    curves = ["curves_drs_norm", "curves_grad_norm", "curves_loss", "curves_reward"]
    assert sorted(plots) == [*curves, "pareto_toy_preference", "pareto_toy_utility"]
    for reward in ("toy_preference", "toy_utility"):
        content = plots[f"pareto_{reward}"][0]["content"]
        assert content["encoding"]["x"]["field"] == "fid_real"
        assert content["encoding"]["y"]["field"] == f"{reward}_mean"
        assert len(content["data"]["values"]) == len(SETS)


@pytest.fixture(scope="module")
def clone(project, tmp_path_factory):
    """An auditor's fresh `git clone` of the project, after `dvc pull` from the local remote the project pushed to."""
    store = tmp_path_factory.mktemp("store")
    run(project, "dvc", "remote", "add", "-d", "store", str(store))
    run(project, "git", "commit", "-qam", "remote")
    run(project, "dvc", "push")
    folder = tmp_path_factory.mktemp("auditor") / "clone"
    run(project, "git", "clone", "-q", str(project), str(folder))
    run(folder, "dvc", "pull")
    return folder


def test_an_auditor_regenerates_a_byte_identical_report(project, clone):
    report = Path("reports") / "tiny"
    assert dvc_json(clone, "status") == {}
    originals = digests(project / report)
    # + curves: 2 PNG, 4 CSV, md; + matched-reward fronts: md, a CSV and a PNG per evaluation reward (2)
    assert len(originals) == 7 + 2 + 4 + 1 + 1 + 2 * 2 and digests(clone / report) == originals
    shutil.rmtree(clone / report)
    text = run(clone, "dvc", "repro", "--force", "--single-item", "report").stdout
    assert re.findall(r"^Running stage '(.+)':$", text, re.MULTILINE) == ["report"]
    assert digests(clone / report) == originals
    assert dvc_json(clone, "status") == {}


@pytest.fixture(scope="module")
def touched(clone):
    """The clone after `snakemake --touch --forceall`: Snakemake's timestamps and metadata for DVC's outputs."""
    run(clone, "snakemake", "--touch", "--forceall", "--cores", "1", "all")
    return clone


def test_snakemake_plans_nothing_after_a_touch_and_dvc_ignores_its_timestamps(touched):
    assert snakemake_jobs(touched) == {}
    assert (touched / "runs" / "tiny" / "warmup" / ".snakemake_timestamp").is_file()
    assert dvc_json(touched, "status") == {}


def test_snakemake_and_dvc_stale_the_same_jobs(touched):
    original = edit_params(touched, "per_prompt: 2", "per_prompt: 3")
    try:
        assert set(snakemake_jobs(touched)) == would_run(touched) == DOWNSTREAM_OF_SAMPLE
    finally:
        (touched / "params.yaml").write_text(original)


def test_snakemake_regenerates_the_report_dvc_recorded(project, touched):
    report = Path("reports") / "tiny"
    shutil.rmtree(touched / report)
    assert set(snakemake_jobs(touched)) == {"report"}
    run(touched, "snakemake", "--cores", "1", "all")
    assert digests(touched / report) == digests(project / report)
    assert dvc_json(touched, "status") == {}
