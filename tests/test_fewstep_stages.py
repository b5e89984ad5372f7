"""Few-step generators through the stages (docs/algorithm.md §8): a K-step warm start, the policy methods (sdpo,
grpo) and DMD2 on a K-step generator through `didr align`, K-step sampling, and the bad settings that stop at load."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from pipeline_project import tiny_params
from safetensors.torch import load_file

from didr.cli import main
from didr.config import ConfigError, load_params
from didr.fewstep import FewStepGenerator
from didr.stages.common import load_prompts, load_teacher

STEPS = 3  # network evaluations per image of the few-step generator
GENERATOR = {"steps": STEPS, "sampler": "ddim", "eta": 1.0}
POLICY = {"groups": 2, "group_size": 2, "buffer_size": 4, "min_count": 2}
METHODS = {"sdpo": "0", "grpo": "0", "dmd2": "1"}  # the grid's methods and their strengths


def run(*args: str) -> int:
    return main([*args, "--quiet"])


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher):
    """The tiny params with a 3-step DDIM-eta generator, a copy of the session's tiny teacher and the K-step
    warm-up run once."""
    root = tmp_path_factory.mktemp("fewstep-world")
    params = tiny_params(warmup={"generator": GENERATOR}, align={"steps": 2, "checkpoint_every": 1, "policy": POLICY})
    params["grid"]["methods"] = {"sdpo": {}, "grpo": {}, "dmd2": {"weight": [1]}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(tiny_teacher, root / "teacher")
    p = ["--params", str(root / "params.yaml")]
    assert run("warmup", *p, "--teacher", str(root / "teacher"), "--out", str(root / "warmup")) == 0
    return root, p


def align(root, p, method: str, strength: str = "0") -> dict:
    out = root / f"align-{method}"
    assert run("align", *p, "--teacher", str(root / "teacher"), "--warmup", str(root / "warmup"), "--out", str(out),
               "--method", method, "--strength", strength) == 0  # fmt: skip
    return json.loads((out / "params.json").read_text())


@pytest.fixture(scope="module")
def aligned(world):
    """Each grid method run once on the K-step warm start: its align stage's params.json by method."""
    root, p = world
    return {method: align(root, p, method, strength) for method, strength in METHODS.items()}


def test_the_warm_start_records_its_k_step_sampler(world):
    root, _ = world
    record = json.loads((root / "warmup" / "params.json").read_text())
    times = record["generator"].pop("times")
    assert record["generator"] == {"steps": STEPS, "sampler": "ddim", "eta": 1.0}
    assert times == pytest.approx([1.0, 2 / 3, 1 / 3], abs=1e-15)  # 1 - k / K


@pytest.mark.parametrize("method", ["sdpo", "grpo"])
def test_policy_methods_train_the_k_step_generator_through_the_align_stage(world, aligned, method):
    root, p = world
    record = aligned[method]
    assert record["method"] == method and record["generator"]["steps"] == STEPS
    out = root / f"align-{method}"
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics["step"].tolist() == [0, 1] and metrics["reward"].notna().all() and metrics["loss"].notna().all()
    before, after = load_file(root / "warmup" / "generator.safetensors"), load_file(out / "generator.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy moved
    assert load_file(out / "fake.safetensors").keys() == load_file(root / "warmup" / "fake.safetensors").keys()
    checkpoints = sorted(q.name for q in (root / f"align-{method}.checkpoints").glob("*/step-*"))
    assert checkpoints == ["step-000001.safetensors", "step-000002.safetensors"]
    # a rerun resumes from the last checkpoint (epoch 2 of 2): the same weights, no new epoch
    shutil.rmtree(out)
    align(root, p, method)
    assert all(torch.equal(after[k], v) for k, v in load_file(out / "generator.safetensors").items())


def test_dmd2_trains_the_k_step_generator_through_the_unchanged_align_loop(world, aligned):
    root, _ = world
    record = aligned["dmd2"]
    assert record["generator"]["steps"] == STEPS
    metrics = pd.read_parquet(root / "align-dmd2" / "metrics.parquet")
    assert metrics["step"].tolist() == [0, 1] and metrics["loss"].notna().all()


def test_the_sample_stage_samples_the_k_step_generator(world):
    root, p = world
    teacher_dir, out = root / "teacher", root / "samples-warm"
    assert run("sample", *p, "--teacher", str(teacher_dir), "--generator", str(root / "warmup"), "--out", str(out)) == 0
    record = json.loads((out / "params.json").read_text())
    assert record["method"] == f"{STEPS}-step (warm start)" and record["nfe"] == STEPS
    index = pd.read_parquet(out / "index.parquet")
    # the warm start is the teacher's network: its samples are the teacher's deterministic 3-step DDIM (eta 0)
    teacher = load_teacher(teacher_dir, torch.device("cpu"))
    prompts = load_prompts(teacher_dir, "eval", torch.device("cpu"))
    params = load_params(root / "params.yaml")
    ids = torch.arange(len(prompts)).repeat_interleave(params.sample.per_prompt)
    z = torch.randn((len(ids), *teacher.sample_shape), generator=torch.Generator().manual_seed(params.sample.seed))
    with torch.no_grad():
        ddim = FewStepGenerator.from_teacher(teacher, STEPS, eta=1.0)(z, prompts.select(ids))
        one_step = teacher.x0(z, torch.full((len(z),), 0.9), prompts.select(ids))
        expected, single = teacher.decode(ddim).clamp(0, 1), teacher.decode(one_step).clamp(0, 1)
    saved = torch.stack([
        torch.from_numpy(np.array(Image.open(out / path).convert("RGB"))).permute(2, 0, 1)
        for path in index["path"]
    ]).float() / 255  # fmt: skip
    assert (saved - expected).abs().max() <= 0.5 / 255 + 1e-6  # PNG rounding only
    assert (saved - single).abs().max() > 10 / 255  # not the one-step generator's images


@pytest.mark.integration  # three sample sets, two scores and the report
def test_the_report_labels_few_step_runs_with_their_step_count(world, aligned):
    root, p = world
    teacher, reference = str(root / "teacher"), root / "report-samples-teacher"
    assert run("sample", *p, "--teacher", teacher, "--out", str(reference)) == 0
    sets = {"warm": root / "warmup", "sdpo": root / "align-sdpo"}
    for name, generator in sets.items():
        samples, score = root / f"report-samples-{name}", root / f"report-score-{name}"
        assert run("sample", *p, "--teacher", teacher, "--generator", str(generator), "--out", str(samples)) == 0
        assert run("score", *p, "--teacher", teacher, "--samples", str(samples), "--reference", str(reference),
                   "--out", str(score)) == 0  # fmt: skip
    out = root / "report"
    assert main(["report", *p, "--scores", *[str(root / f"report-score-{n}") for n in sets],
                 "--samples", *[str(root / f"report-samples-{n}") for n in sets], "--out", str(out)]) == 0  # fmt: skip
    table = pd.read_csv(out / "metrics.csv").set_index("method")
    assert table["nfe"].to_dict() == {f"{STEPS}-step (warm start)": STEPS, f"sdpo ({STEPS}-step)": STEPS}
    fronts = pd.read_csv(out / "fronts.csv")  # the K-step warm start is a reference (a star), not a front
    assert set(fronts["method"]) == {f"sdpo ({STEPS}-step)"}
    assert (out / "pareto_toy_preference.png").is_file()


BAD = [
    ({"warmup": {"generator": {"steps": 0}}}, "warmup.generator.steps: 0 is less than the minimum of 1"),
    ({"warmup": {"generator": {"eta": 1.5}}}, "warmup.generator.eta: 1.5 is greater than the maximum of 1"),
    ({"warmup": {"generator": {"sampler": "euler"}}}, "warmup.generator.sampler: 'euler' is not one of"),
    ({"align": {"policy": {"group_size": 1}}}, "align.policy.group_size: 1 is less than the minimum of 2"),
    ({"warmup": {"generator": {"steps": 3, "eta": 0.0}}}, "warmup.generator.eta: sdpo needs a stochastic sampler"),
    ({"warmup": {"generator": {"steps": 1}}}, "warmup.generator.steps: sdpo trains stochastic transitions"),
    ({"warmup": {"generator": {"steps": 3, "sampler": "sde"}}}, "warmup.generator.sampler: 'sde' (Flow-GRPO) needs"),
    ({"warmup": {"generator": {"steps": 3, "times": [1.0, 0.5]}}}, "warmup.generator.times: holds 2 values"),
    ({"warmup": {"generator": {"steps": 2, "times": [0.5, 0.5]}}}, "warmup.generator.times: must decrease"),
    ({"align": {"policy": {"buffer_size": 4, "min_count": 8}}}, "align.policy.min_count: must not exceed"),
]


@pytest.mark.parametrize(("update", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_few_step_settings_stop_at_load_with_one_line_naming_the_key(tmp_path, update, message):
    params = tiny_params(**{s: {**tiny_params()[s], **v} for s, v in update.items()})
    params["grid"]["methods"] = {"sdpo": {}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value) and "\n" not in str(error.value)


def test_grpo_sub_steps_beyond_the_transitions_stop_at_load(tmp_path):
    params = tiny_params(warmup={"generator": GENERATOR}, align={"policy": {"train_steps": 2, "step_range": 3}})
    params["grid"]["methods"] = {"grpo": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"align.policy.train_steps: need train_steps <= step_range <= 2"):
        load_params(tmp_path / "params.yaml")


def test_a_bad_setting_stops_the_command_before_any_output(tmp_path, tiny_teacher, capsys):
    params = tiny_params(warmup={"generator": {"steps": 3, "eta": 0.0}})
    params["grid"]["methods"] = {"sdpo": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = run("warmup", "--params", str(tmp_path / "params.yaml"), "--teacher", str(tiny_teacher),
               "--out", str(tmp_path / "warmup"))  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "warmup.generator.eta: sdpo needs a stochastic sampler" in err and "\n" not in err
    assert not (tmp_path / "warmup").exists()
