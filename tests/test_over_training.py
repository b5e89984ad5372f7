"""Reward and fidelity over training (align.evaluate_at): the key's checks, the snapshot sets in the one job table
(Snakemake, DVC, the launcher), the seed-mean table, and the tiny pipeline's snapshots, their exact resume, their
samples, scores and the report's over-training table."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_project import TINY_PARAMS, planned_jobs, scratch_project, snakemake, tiny_params
from safetensors.torch import load_file

from didr import jobs, layout
from didr.cli import main
from didr.config import ConfigError, load_params
from didr.dvc_pipeline import pipeline
from didr.evaluation.over_training import over_training_table, with_steps
from didr.launch import stage_tasks

RUN = "method=didr/beta=0.5/seed=0"
REWARD = "toy_preference"


def params_file(folder: Path, **align: object) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(align=align)))
    return path


@pytest.mark.parametrize(
    ("steps", "problem"),
    [
        ([-1], "align.evaluate_at[0]: -1 is less than the minimum of 1"),
        ([0], "align.evaluate_at[0]: 0 is less than the minimum of 1"),
        ([3, 2], "align.evaluate_at: must increase strictly, got [3, 2]"),
        ([2, 2], "align.evaluate_at: [2, 2] has non-unique elements"),
        ([4], "align.evaluate_at: 4 is not below align.steps (4; the final set is that step)"),
        ([1.5], "align.evaluate_at[0]: 1.5 is not of type 'integer'"),
    ],
)
def test_evaluate_at_refuses_bad_steps_in_one_line(tmp_path, steps, problem):
    path = params_file(tmp_path, evaluate_at=steps)
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert str(error.value) == f"{path}: {problem}"


def test_a_grid_steps_axis_below_evaluate_at_is_refused(tmp_path):
    data = tiny_params(align={"evaluate_at": [2], "steps": 8})
    data["grid"]["methods"]["didr"]["steps"] = [8, 2]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"align.evaluate_at: 2 is not below align.steps \(2;"):
        load_params(tmp_path / "p.yaml")


def test_snapshot_sets_come_from_the_one_job_table(tmp_path):
    assert jobs.sample_sets(load_params(TINY_PARAMS)) == ["teacher", "warm-start", RUN, "method=dipp/alpha=2/seed=0"]
    path = params_file(tmp_path, evaluate_at=[1, 3])
    p = load_params(path)
    snapshots = [f"step={k}/{run}" for k in (1, 3) for run in (RUN, "method=dipp/alpha=2/seed=0")]
    assert jobs.sample_sets(p)[4:] == snapshots and layout.parse_snapshot_set(snapshots[1]) == (snapshots[1][7:], 1)
    assert layout.parse_snapshot_set(RUN) is None and layout.parse_snapshot_set("step=x/a") is None
    sample = jobs.job(p, "sample", f"step=3/{RUN}")
    assert sample.input["generator"] == f"runs/tiny/align/{RUN}"  # the align job's output: the dependency
    assert sample.output == f"runs/tiny/samples/step=3/{RUN}"  # beside the run's final set, not inside it
    assert sample.command(str(path))[-4:] == ["--generator", f"runs/tiny/align/{RUN}/snapshots/step=3", "--out",
                                              sample.output]  # fmt: skip
    score = jobs.job(p, "score", f"step=3/{RUN}")
    assert score.input["samples"] == sample.output and score.output == f"runs/tiny/scores/step=3/{RUN}"
    assert f"runs/tiny/scores/step=1/{RUN}" in jobs.job(p, "report").input["scores"]
    dvc = pipeline(str(path))["stages"]["sample"]["foreach"][f"step=3/{RUN}"]
    assert dvc == {"model": f"runs/tiny/align/{RUN}", "option": f"--generator runs/tiny/align/{RUN}/snapshots/step=3"}
    tasks = stage_tasks(p, path, "score", [])
    assert [t.name for t in tasks][4:] == snapshots


def scored_sets() -> pd.DataFrame:
    """Two seeds of one setting: snapshots at step 2, final sets (final step 6), and a run without snapshots."""
    rows = []
    for seed, (reward, fid, final_reward, final_fid) in enumerate([(1.0, 10.0, 3.0, 30.0), (2.0, 14.0, 5.0, 40.0)]):
        setting = f"beta=0.5/seed={seed}"
        rows += [
            {"method": "didr", "setting": setting, "step": 2, "final_step": 6, f"{REWARD}_mean": reward,
             "fid_real": fid, "fid_real_low": fid - 1, "fid_real_high": fid + 1, "fid_teacher": fid / 2},
            {"method": "didr", "setting": setting, "step": None, "final_step": None, f"{REWARD}_mean": final_reward,
             "fid_real": final_fid, "fid_real_low": final_fid - 2, "fid_real_high": final_fid + 3,
             "fid_teacher": final_fid / 2},
        ]  # fmt: skip
    rows.append({"method": "teacher", "setting": "steps=3", "step": None, "final_step": None, f"{REWARD}_mean": 9.0,
                 "fid_real": 1.0, "fid_real_low": 0.5, "fid_real_high": 1.5, "fid_teacher": 0.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_over_training_table_is_the_seed_mean_with_the_spread_over_seeds():
    table = over_training_table(with_steps(scored_sets()), REWARD)
    assert table[["method", "setting", "step", "seeds"]].values.tolist() == [["didr", "beta=0.5", 2, 2],
                                                                            ["didr", "beta=0.5", 6, 2]]  # fmt: skip
    assert table[REWARD].tolist() == [1.5, 4.0]
    assert table[f"{REWARD}_sd"].tolist() == pytest.approx([0.5**0.5, 2**0.5])  # sample sd of (1, 2) and (3, 5)
    assert table["fid_real"].tolist() == [12.0, 35.0]
    assert table["fid_real_sd"].tolist() == pytest.approx([8**0.5, 50**0.5])
    assert table["fid_real_low"].tolist() == [11.0, 33.0] and table["fid_real_high"].tolist() == [13.0, 38.0]
    assert table["fid_teacher"].tolist() == [6.0, 17.5] and "fid_teacher_low" not in table


def test_a_run_with_snapshots_needs_its_final_set():
    sets = scored_sets()
    sets = sets[~((sets["setting"] == "beta=0.5/seed=1") & sets["step"].isna())]
    with pytest.raises(ValueError, match=r"^didr beta=0.5/seed=1: snapshot sets are scored but not the run's final"):
        with_steps(sets)


@pytest.mark.integration
def test_dry_run_plans_a_sample_and_a_score_job_per_run_and_step(tmp_path):
    project = scratch_project(tmp_path / "p")
    data = yaml.safe_load((project / "params.yaml").read_text())
    data["align"]["evaluate_at"] = [2]
    (project / "params.yaml").write_text(yaml.safe_dump(data))
    counts = planned_jobs(project)
    assert (counts["align"], counts["sample"], counts["score"], counts["report"]) == (2, 4 + 2, 4 + 2, 1)
    plan = snakemake(project, "all", "--dry-run").stdout
    assert f"runs/tiny/samples/step=2/{RUN}" in plan and "runs/tiny/scores/step=2/method=dipp/alpha=2/seed=0" in plan
    assert "reports/tiny/over_training_toy_utility.png" in plan and "reports/tiny/over_training.md" in plan


def run_job(params: Path, stage: str, name: str | None = None) -> None:
    """A job as the pipeline runs it: its command from the job table, in the project folder (the cwd), on one
    thread (as the align job's default: the resumed run below matches it bit for bit)."""
    p = load_params(params)
    command = jobs.job(p, stage, name).command(str(params), threads=1)
    assert main([*command[1:], *([] if stage == "report" else ["--quiet"])]) == 0


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_teacher):
    """The tiny params with evaluate_at [2, 3] and one run: teacher (the session's), warmup and align jobs run."""
    root = tmp_path_factory.mktemp("over-training")
    data = tiny_params(align={"evaluate_at": [2, 3]})
    data["grid"]["methods"] = {"didr": {"beta": [0.5]}}
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    shutil.copytree(tiny_teacher, root / "runs" / "tiny" / "teacher")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run_job(Path("params.yaml"), "warmup")
        run_job(Path("params.yaml"), "align", RUN)
    return root


@pytest.mark.integration
def test_snapshots_are_the_ema_of_the_checkpoint_at_their_step(project):
    out = project / layout.align_dir("tiny", RUN)
    assert sorted(q.name for q in (out / "snapshots").iterdir()) == ["step=2", "step=3"]
    (checkpoints,) = (project / layout.checkpoints_dir("tiny", RUN)).iterdir()  # the run's digest folder
    saved = load_file(checkpoints / "step-000002.safetensors")
    snapshot = load_file(out / "snapshots" / "step=2" / "generator.safetensors")
    ema = {key[4:]: t for key, t in saved.items() if key.startswith("ema/")}
    assert ema and all(snapshot[name].equal(t) for name, t in ema.items())
    assert not all(load_file(out / "generator.safetensors")[n].equal(t) for n, t in ema.items())  # step 4 moved on
    record = json.loads((out / "snapshots" / "step=3" / "params.json").read_text())
    assert (record["step"], record["run"]) == (3, RUN)


@pytest.mark.integration
def test_a_resumed_run_writes_the_same_snapshots(project, tmp_path):
    """The files a run preempted after its step-2 checkpoint leaves (that checkpoint, the step-2 snapshot, the metric
    log), resumed by the align stage: every snapshot and the final generator equal the uninterrupted run's."""
    (checkpoints,) = (project / layout.checkpoints_dir("tiny", RUN)).iterdir()
    preempted = tmp_path / "checkpoints" / checkpoints.name
    shutil.copytree(checkpoints, preempted)
    (preempted / "step-000004.safetensors").unlink()
    shutil.rmtree(preempted / "snapshots" / "step=3")
    resumed = tmp_path / "align"
    command = jobs.job(load_params(project / "params.yaml"), "align", RUN).command("params.yaml")  # 1 thread
    elsewhere = {"--checkpoints": str(tmp_path / "checkpoints"), "--out": str(resumed)}
    command = [elsewhere.get(before, word) for before, word in zip(["", *command], command, strict=False)]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        assert main([*command[1:], "--quiet"]) == 0
    out = project / layout.align_dir("tiny", RUN)
    for name in ["generator.safetensors", "snapshots/step=2/generator.safetensors",
                 "snapshots/step=3/generator.safetensors"]:  # fmt: skip
        assert (resumed / name).read_bytes() == (out / name).read_bytes(), name
    assert len(pd.read_parquet(resumed / "metrics.parquet")) == 4


@pytest.mark.integration
def test_snapshot_sets_are_sampled_scored_and_reported_over_training(project):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        params = Path("params.yaml")
        for sample_set in jobs.sample_sets(load_params(params)):
            run_job(params, "sample", sample_set)
        for sample_set in jobs.sample_sets(load_params(params)):
            run_job(params, "score", sample_set)
        run_job(params, "report")
    samples = {k: project / layout.samples_dir("tiny", f"step={k}/{RUN}") for k in (2, 3)}
    record = json.loads((samples[2] / "params.json").read_text())
    assert (record["step"], record["final_step"], record["run"], record["method"]) == (2, 4, RUN, "didr")
    images = {k: (folder / "images" / "00000.png").read_bytes() for k, folder in samples.items()}
    assert images[2] != images[3]  # two generators, the same noise and prompt
    report = project / layout.report_dir("tiny")
    assert len(pd.read_csv(report / "metrics.csv")) == 3  # the teacher, the warm start, the run's final set
    summaries = [json.loads((project / layout.scores_dir("tiny", s) / "summary.json").read_text())
                 for s in (f"step=2/{RUN}", f"step=3/{RUN}", RUN)]  # fmt: skip
    for reward in ("toy_preference", "toy_utility"):
        table = pd.read_csv(report / f"over_training_{reward}.csv")
        assert table[["method", "setting", "step", "seeds"]].values.tolist() == [
            ["didr", "beta=0.5", k, 1] for k in (2, 3, 4)
        ]
        assert table[reward].tolist() == [s[f"{reward}_mean"] for s in summaries]
        for column in ("fid_real", "fid_real_low", "fid_real_high", "fid_teacher", "fid_teacher_low"):
            assert table[column].tolist() == pytest.approx([s[column] for s in summaries], rel=1e-12)
        assert table[f"{reward}_sd"].isna().all()  # one seed: no spread
        assert (report / f"over_training_{reward}.png").stat().st_size > 1000
    captions = (report / "over_training.md").read_text().splitlines()
    assert captions[2] == "![over_training_toy_preference.png](over_training_toy_preference.png)"
    assert captions[4].startswith("toy_preference and FID") and "1 seed(s)" in captions[4]
