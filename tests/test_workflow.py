"""The Snakemake DAG: job counts of the repository's params and presets, bad input stopped before any job, a real
run of the tiny DAG, reruns limited to what a change touches, the HTML report, and `snakemake --lint`."""

import json
from dataclasses import asdict

import pytest
import yaml
from pipeline_project import ROOT, planned_jobs, scratch_project, snakemake

from didr.config import SampleParams, load_params
from didr.grid import expand_grid

pytestmark = pytest.mark.integration  # Snakemake plans and runs the tiny DAG in subprocesses


def stage_counts(runs: int) -> dict[str, int]:
    """Jobs per rule for a grid of `runs` align runs: two reference sample sets besides the grid."""
    sets = runs + 2
    return {"teacher": 1, "warmup": 1, "align": runs, "sample": sets, "score": sets, "report": 1, "export": runs,
            "all": 1}  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        (None, 6),
        ("presets/embedded-sweep.yaml", 39),
        ("presets/embedded-flow.yaml", 13),
        ("presets/embedded-fewstep.yaml", 6),
        ("presets/embedded-didr-search.yaml", 42),
        ("presets/embedded-fronts.yaml", 60),
    ],
)
def test_dry_run_plans_every_stage_of_the_grid(tmp_path, preset, expected):
    project = scratch_project(tmp_path / "p", params=ROOT / "params.yaml")
    args = [] if preset is None else ["--configfile", preset]
    runs = len(expand_grid(load_params(ROOT / (preset or "params.yaml")).grid))
    assert runs == expected
    assert planned_jobs(project, *args) == stage_counts(runs)


ZOO_PRESETS = {
    "sdxl-dipp": 8,
    "sdxl-didr": 9,
    "sdxl-dmd2": 3,
    "sdxl-dmd2-full-x8": 3,
    "zimage-didr": 9,
    "sdturbo-sdpo": 1,
    "sd35-rtdmd": 2,
}


@pytest.mark.parametrize(("preset", "runs"), ZOO_PRESETS.items())
def test_model_zoo_presets_plan_their_grid_with_the_80gb_resources(tmp_path, preset, runs):
    """No weights are needed to plan: the pinned sources, the local files and the rewards resolve only in the jobs."""
    project = scratch_project(tmp_path / "p", params=ROOT / "params.yaml")
    params = load_params(ROOT / "presets" / f"{preset}.yaml")
    assert params.teacher.kind == "pretrained" and len(params.teacher.revision) == 40
    assert len(expand_grid(params.grid)) == runs
    args = ["--configfile", f"presets/{preset}.yaml", "--workflow-profile", "gpu-80gb"]
    assert planned_jobs(project, *args) == stage_counts(runs)
    plan = snakemake(project, "all", "--dry-run", *args).stdout
    align = [block for block in plan.split("rule ")[1:] if block.startswith("align:")]
    assert len(align) == runs and all("runtime=2880," in block and "mem_mb=128000," in block for block in align)


def test_config_is_the_params_file_the_jobs_read(tmp_path):
    """With a preset, Snakemake's `config` (which the report's captions read) is the preset alone, with the defaults
    the `didr` commands take, not params.yaml deep-merged with it; --config, which the commands never see, stops."""
    project = scratch_project(tmp_path / "p")
    preset = yaml.safe_load((project / "params.yaml").read_text())
    preset["grid"]["methods"] = {"didr": {"beta": [0.25]}}  # params.yaml's grid also has dipp
    del preset["sample"]  # the jobs take the defaults
    (project / "preset.yaml").write_text(yaml.safe_dump(preset))
    (project / "probe.smk").write_text(
        'include: "Snakefile"\n\n\nimport json\n\nwith open("config.json", "w") as f:\n    json.dump(config, f)\n'
    )
    result = snakemake(project, "-s", "probe.smk", "--dry-run", "all", "--configfile", "preset.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((project / "config.json").read_text())
    assert config["grid"]["methods"] == {"didr": {"beta": [0.25]}}
    assert config == json.loads(json.dumps(asdict(load_params(project / "preset.yaml"))))
    assert config["sample"]["teacher_steps"] == SampleParams.teacher_steps  # the caption of metrics.csv reads it
    refused = snakemake(project, "--dry-run", "all", "--config", "seed=1")
    assert refused.returncode != 0
    assert "--config: the didr commands read the params file only" in refused.stdout + refused.stderr


def test_lint_is_clean():
    result = snakemake(ROOT, "--lint")
    assert result.returncode == 0 and "Congratulations" in result.stdout + result.stderr, result.stdout


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["grid"]["methods"].update(dird={"beta": [1]}), "grid.methods.dird: unknown key"),
        (lambda p: p["rewards"].update(train="hpsv9"), "rewards.train: unknown reward 'hpsv9'"),
        (lambda p: p["grid"]["methods"].update(didr={"beta": []}), "grid.methods.didr.beta: no values"),
        (lambda p: p["grid"]["methods"].update(dipp={"alpha": [-2]}), "grid.methods.dipp.alpha[0]: -2 is less than"),
        (lambda p: p["prompts"].update(eval="data/prompts/nope.txt"), "prompts.eval: prompt file data/prompts/nope"),
    ],
)
def test_bad_params_stop_before_any_job_with_one_line(tmp_path, edit, message):
    project = scratch_project(tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    edit(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = snakemake(project, "--cores", "1", "all", timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if message in line]
    assert lines and lines[0].startswith("params.yaml: "), result.stderr
    assert not (project / "runs").exists() and not (project / "logs").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny DAG run for real with `snakemake --cores 2 all`."""
    project = scratch_project(tmp_path_factory.mktemp("workflow") / "p")
    result = snakemake(project, "--cores", "2", "all")
    assert result.returncode == 0, result.stderr[-3000:]
    return project


def test_the_tiny_dag_writes_the_report_with_both_references(finished):
    report = finished / "reports" / "tiny"
    table = json.loads((report / "metrics.json").read_text())
    assert sorted(table) == [
        "didr/beta=0.5/seed=0",
        "dipp/alpha=2/seed=0",
        "one-step (warm start)/t_star=0.9",
        "teacher/steps=3,cfg=3.0",
    ]
    assert all(table[key]["fid_real"] > 0 for key in table)
    for stage in ("teacher", "warmup", "report"):
        assert (finished / "logs" / "tiny" / f"{stage}.log").is_file()
        assert (finished / "logs" / "tiny" / "benchmarks" / f"{stage}.tsv").is_file()
    assert list((finished / "runs/tiny/checkpoints/method=didr/beta=0.5/seed=0").glob("*/step-000004.safetensors"))
    assert planned_jobs(finished) == {}


def test_changing_one_value_reruns_only_what_depends_on_it(finished):
    params_file = finished / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["grid"]["methods"]["didr"]["beta"].append(0.25)
        params_file.write_text(yaml.safe_dump(params))
        assert planned_jobs(finished) == {"align": 1, "sample": 1, "score": 1, "report": 1, "export": 1, "all": 1}
        params = yaml.safe_load(original)
        params["sample"]["per_prompt"] = 3
        params_file.write_text(yaml.safe_dump(params))
        assert planned_jobs(finished) == {"sample": 4, "score": 4, "report": 1, "export": 2, "all": 1}
        params = yaml.safe_load(original)
        params["align"]["steps"] = 5
        params_file.write_text(yaml.safe_dump(params))
        assert planned_jobs(finished) == {"align": 2, "sample": 2, "score": 2, "report": 1, "export": 2, "all": 1}
    finally:
        params_file.write_text(original)
    assert planned_jobs(finished) == {}


def test_html_report_has_captions_plots_and_grid(finished):
    result = snakemake(finished, "--report", "reports/report.html", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (finished / "reports" / "report.html").read_text()
    for text in ("pareto_toy_preference.png", "pareto_toy_utility.png", "grid.png", "fronts.csv", "metrics.csv",
                 "Pareto front", "same initial noise"):  # fmt: skip
        assert text in html, text
