"""The six stages end to end through the `didr` command on a tiny params file, and their bad-input errors."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from pipeline_project import tiny_params
from safetensors.torch import load_file

from didr.cli import main
from didr.stages.score import load_images
from didr.toy.data import ATTRIBUTES, parse_prompt
from didr.toy.rewards import load_toy_reward

TOY_REWARDS = ["toy_preference", "toy_aesthetic", "toy_alignment", "toy_utility"]


def run(*args: str) -> int:
    return main([*args, "--quiet"] if args[0] not in ("report",) else list(args))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher):
    """The tiny params with every toy reward evaluated, a copy of the session's tiny teacher (the teacher stage on
    the same tiny params), and the warm-up stage run once."""
    root = tmp_path_factory.mktemp("world")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(rewards={"eval": TOY_REWARDS})))
    p = ["--params", str(root / "params.yaml")]
    shutil.copytree(tiny_teacher, root / "teacher")
    assert run("warmup", *p, "--teacher", str(root / "teacher"), "--out", str(root / "warmup")) == 0
    return root, p


def test_teacher_and_warmup_outputs(world, tiny_teacher):
    root, _ = world
    teacher = root / "teacher"
    assert (teacher / "pipeline" / "model_index.json").is_file()
    assert {p.name for p in (teacher / "rewards").iterdir()} >= {"alignment", "preference", "metrics.json"}
    assert sorted(p.name for p in (teacher / "embeddings").iterdir()) == [
        "eval-00000.safetensors",
        "train-00000.safetensors",
    ]
    record = json.loads((teacher / "params.json").read_text())
    assert record["params"]["teacher"]["steps"] == 30
    assert {p.name for p in (root / "warmup").iterdir()} == {"generator.safetensors", "fake.safetensors", "params.json"}
    for folder in (root, tiny_teacher.parent):  # where warmup and teacher ran: no temporary folders left
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_align_sample_score_report_chain(world):
    root, p = world
    teacher, warmup = str(root / "teacher"), str(root / "warmup")
    runs = {"didr": "1.0", "dipp": "2.0"}
    for method, strength in runs.items():
        out = root / f"align-{method}"
        assert run("align", *p, "--teacher", teacher, "--warmup", warmup, "--out", str(out),
                   "--method", method, "--strength", strength) == 0  # fmt: skip
        metrics = pd.read_parquet(out / "metrics.parquet")
        assert metrics["step"].tolist() == [0, 1, 2, 3] and metrics["loss"].notna().all()
        assert json.loads((out / "params.json").read_text())["method"] == method
        assert {q.name for q in out.iterdir()} == {"generator.safetensors", "fake.safetensors", "metrics.parquet",
                                                   "params.json"}  # fmt: skip
        assert sorted(q.name for q in (root / f"align-{method}.checkpoints").glob("*/step-*")) == [
            "step-000002.safetensors", "step-000004.safetensors"]  # fmt: skip
    assert "drs_norm" in pd.read_parquet(root / "align-didr" / "metrics.parquet")

    sets = {"teacher": None, "warm": warmup, **{m: str(root / f"align-{m}") for m in runs}}
    for name, generator in sets.items():
        extra = [] if generator is None else ["--generator", generator]
        assert run("sample", *p, "--teacher", teacher, *extra, "--out", str(root / f"samples-{name}")) == 0
        index = pd.read_parquet(root / f"samples-{name}" / "index.parquet")
        assert len(index) == 4 * 2 and all((root / f"samples-{name}" / path).is_file() for path in index["path"])
    first = pd.read_parquet(root / "samples-didr" / "index.parquet")
    assert first["prompt"].tolist() == pd.read_parquet(root / "samples-teacher" / "index.parquet")["prompt"].tolist()

    for name in sets:
        assert run("score", *p, "--teacher", teacher, "--samples", str(root / f"samples-{name}"),
                   "--reference", str(root / "samples-teacher"), "--out", str(root / f"score-{name}")) == 0  # fmt: skip
    summary = json.loads((root / "score-teacher" / "summary.json").read_text())
    assert summary["fid_teacher"] == pytest.approx(0.0, abs=1e-3)  # the reference against itself (float64 noise)
    assert summary["fid_real"] > 1.0
    per_image = pd.read_parquet(root / "score-didr" / "per_image.parquet")
    assert {"toy_preference", "toy_aesthetic", "toy_alignment", "toy_utility"} <= set(per_image.columns)
    # prompt following: the classifier's reading of each image against its prompt, attribute by attribute
    scorer = load_toy_reward("alignment", root / "teacher" / "rewards")
    _, images = load_images(root / "samples-didr")
    read = torch.stack([lg.argmax(1) for lg in scorer.logits(images)], 1)
    labels = torch.stack([parse_prompt(q) for q in per_image["prompt"]])
    for i, attribute in enumerate(ATTRIBUTES):
        assert per_image[f"match_{attribute}"].tolist() == (read[:, i] == labels[:, i]).double().tolist()
    summary = json.loads((root / "score-didr" / "summary.json").read_text())
    assert summary["match_shape"] == pytest.approx(per_image["match_shape"].mean())

    report = root / "report"
    assert run("report", *p, "--scores", *[str(root / f"score-{n}") for n in sets],
               "--samples", *[str(root / f"samples-{n}") for n in sets], "--out", str(report)) == 0  # fmt: skip
    table = pd.read_csv(report / "metrics.csv")
    assert sorted(table["method"]) == sorted(["teacher", "one-step (warm start)", "didr", "dipp"])
    assert {f"pareto_{r}.png" for r in ("toy_preference", "toy_aesthetic", "toy_alignment", "toy_utility")} <= {
        q.name for q in report.iterdir()
    }
    assert (report / "grid.png").stat().st_size > 1000
    assert "didr/beta=1/seed=0" in json.loads((report / "metrics.json").read_text())


def test_align_resumes_instead_of_redoing(world, capsys):
    root, p = world
    out = root / "align-resume"
    args = ["align", *p, "--teacher", str(root / "teacher"), "--warmup", str(root / "warmup"), "--out", str(out),
            "--method", "didr", "--strength", "0.5"]  # fmt: skip
    assert run(*args) == 0
    first = (out / "generator.safetensors").read_bytes()
    assert run(*args) == 0  # a finished run loads its final checkpoint and writes the same generator
    assert (out / "generator.safetensors").read_bytes() == first
    edited = yaml.safe_load((root / "params.yaml").read_text())  # edits the run does not train with
    edited["grid"]["methods"]["didr"]["beta"].append(0.25)
    edited["sample"]["per_prompt"] += 1
    (root / "edited.yaml").write_text(yaml.safe_dump(edited))
    assert run("align", "--params", str(root / "edited.yaml"), *args[3:]) == 0  # the same run: resumed, not redone
    assert (out / "generator.safetensors").read_bytes() == first
    assert run(*args, "--set", "align.steps=6") == 0  # changed settings: a fresh run beside the old checkpoints
    assert len(pd.read_parquet(out / "metrics.parquet")) == 6
    assert len(list((root / "align-resume.checkpoints").iterdir())) == 2


def test_lora_with_checkpointing_saves_adapters_and_starts_at_the_full_warm_start(world, tmp_path):
    root, p = world
    teacher = str(root / "teacher")
    lora = [*p, "--set", "finetune.lora_rank=2", "--set", "finetune.gradient_checkpointing=true"]
    warmup, aligned = tmp_path / "warmup", tmp_path / "align"
    assert run("warmup", *lora, "--teacher", teacher, "--out", str(warmup)) == 0
    assert run("align", *lora, "--teacher", teacher, "--warmup", str(warmup), "--out", str(aligned),
               "--method", "didr", "--strength", "1") == 0  # fmt: skip
    full = load_file(root / "warmup" / "generator.safetensors")
    for folder in (warmup, aligned):
        for name in ("generator", "fake"):
            saved = load_file(folder / f"{name}.safetensors")
            assert saved and all("lora_" in key for key in saved)
            assert sum(t.numel() for t in saved.values()) < sum(t.numel() for t in full.values()) / 4
    assert any(t.abs().sum() > 0 for k, t in load_file(aligned / "generator.safetensors").items() if "lora_B" in k)
    for name, generator in {"full": root / "warmup", "lora": warmup}.items():
        assert run("sample", *p, "--teacher", teacher, "--generator", str(generator),
                   "--out", str(tmp_path / f"samples-{name}")) == 0  # fmt: skip
    for path in pd.read_parquet(tmp_path / "samples-lora" / "index.parquet")["path"]:
        # LoRA's B starts at zero: the LoRA warm start draws exactly the full warm start's images
        assert (tmp_path / "samples-lora" / path).read_bytes() == (tmp_path / "samples-full" / path).read_bytes()


def test_bad_inputs_fail_with_one_line_naming_the_file(world, capsys, tmp_path):
    root, p = world
    teacher = str(root / "teacher")

    def error_of(*args: str) -> str:
        assert run(*args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    missing = tmp_path / "nowhere"
    assert f"{missing}/params.json: missing" in error_of(
        "align", *p, "--teacher", teacher, "--warmup", str(missing), "--out", str(tmp_path / "a"),
        "--method", "didr", "--strength", "1",
    )  # fmt: skip
    assert "method: unknown method 'didrr'" in error_of(
        "align", *p, "--teacher", teacher, "--warmup", str(root / "warmup"), "--out", str(tmp_path / "b"),
        "--method", "didrr", "--strength", "1",
    )  # fmt: skip
    other = tmp_path / "other-warmup"
    shutil.copytree(root / "warmup", other)
    shutil.copy(root / "warmup" / "generator.safetensors", other / "fake.safetensors")
    (other / "fake.safetensors").write_bytes((other / "fake.safetensors").read_bytes()[:100])
    assert f"{other}/fake.safetensors: not a readable safetensors file" in error_of(
        "align", *p, "--teacher", teacher, "--warmup", str(other), "--out", str(tmp_path / "c"),
        "--method", "didr", "--strength", "1",
    )  # fmt: skip
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").rglob("*.safetensors"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = yaml.safe_load(Path(p[1]).read_text())
    bad["prompts"]["eval"] = str(empty)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert f"{empty}: no prompts" in error_of(
        "teacher", "--params", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "t")
    )
    assert not (tmp_path / "t").exists()
    assert "no teacher stage output" in error_of("sample", *p, "--teacher", str(missing), "--out", str(tmp_path / "s"))


def test_grid_columns_spread_over_distinct_prompts():
    from didr.stages.report import spread_rows

    prompts = [p for p in "abcdefgh" for _ in range(2)]  # two seeds per prompt, sorted as the evaluation files are
    assert spread_rows(prompts, 4) == [0, 4, 10, 14]  # a, c, f, h: first and last prompt, their first seed each
    assert spread_rows(prompts, 12) == list(range(0, 16, 2))  # fewer prompts than columns: each once
    assert spread_rows(["x", "y", "x"], 2) == [0, 1]


def test_grid_thumbnails_keep_small_images_and_shrink_large_ones():
    from didr.stages.report import thumbnails

    small, large = torch.rand(2, 3, 16, 16), torch.full((2, 3, 1024, 1024), 0.25)
    assert thumbnails(small) is small
    shrunk = thumbnails(large)
    assert shrunk.shape == (2, 3, 128, 128) and torch.allclose(shrunk, torch.tensor(0.25))


def test_lora_copies_share_the_teachers_frozen_weights_and_full_copies_do_not(world):
    from didr.stages.common import load_teacher, new_fake, new_generator

    root, _ = world
    teacher = load_teacher(root / "teacher", torch.device("cpu"))
    params = json.loads((root / "warmup" / "params.json").read_text())["params"]
    lora = {**params, "finetune": {"lora_rank": 2, "gradient_checkpointing": False}}
    teacher_weights = {id(p) for p in teacher.parameters()}
    for copy in (new_fake(teacher, lora), new_generator(teacher, lora).body):
        frozen = [p for p in copy.parameters() if not p.requires_grad]
        assert len(frozen) == len(teacher_weights) and {id(p) for p in frozen} == teacher_weights
        assert all("lora_" in name for name, p in copy.named_parameters() if p.requires_grad)
    assert not teacher_weights & {id(p) for p in new_fake(teacher, params).parameters()}  # full fine-tuning
    assert not any(p.requires_grad for p in teacher.parameters())


def test_generator_weights_of_another_network_fail_with_one_line_naming_the_file(world, capsys, tmp_path):
    root, p = world
    other = tmp_path / "other.safetensors"
    shutil.copy(root / "warmup" / "fake.safetensors", other)  # the fake score's state: keys under "net."
    out = tmp_path / "warmup"
    assert run("warmup", *p, "--teacher", str(root / "teacher"), "--out", str(out),
               "--set", f"warmup.generator_weights={{file: {other}}}") == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert f"{other}: weights of another model" in err and "\n" not in err
    assert not out.exists()
