"""params.yaml checking, stage I/O (atomic folders, prompt files, embedding shards, weights) and Pareto fronts."""

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from didr.backbones.base import Conditioning
from didr.config import ConfigError, load_params
from didr.evaluation.pareto import dominates, hypervolume, pareto_front
from didr.stages.io import (
    StageInputError,
    load_embeddings,
    load_weights,
    read_prompts,
    save_embeddings,
    save_weights,
)
from didr.toy.data import prompt_sets
from didr.training.atomic import atomic_dir

ROOT = Path(__file__).parents[1]


def test_repository_params_and_prompt_files_are_valid_and_in_sync():
    params = load_params(ROOT / "params.yaml")
    train, evaluation = prompt_sets()
    assert read_prompts(ROOT / params.prompts.train) == train
    assert read_prompts(ROOT / params.prompts.eval) == evaluation


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("align:\n  stpes: 3\n", "align.stpes: unknown key (known: batch_size, "),
        ("align:\n  steps: 0\n", "align.steps: 0 is less than the minimum of 1"),
        ("align:\n  drs_t_max: 1.5\n", "align.drs_t_max: 1.5 is greater than the maximum of 1"),
        ("align:\n  t_min: 0.5\n  t_max_sampling: 0.4\n", "align.t_min: must be below align.t_max_sampling"),
        ("teacher:\n  kind: ve\n", "teacher.kind: 've' is not one of ['vp', 'flow', 'pretrained']"),
        ("teacher:\n  kind: pretrained\n", "teacher.source: missing"),
        ("teacher:\n  revision: main\n", "teacher.revision: 'main' does not match"),
        ("teacher:\n  kind: pretrained\n  source: a/b\n", "rewards.train: toy_preference exists only in the embedded"),
        ("finetune:\n  lora_rank: -1\n", "finetune.lora_rank: -1 is less than the minimum of 0"),
        ("score:\n  features: inception\n", "score.inception: missing"),
        ("rewards:\n  models: {toy_utility: {}, hpsv9: {}}\n", "rewards.models.hpsv9: not a reward of rewards.train"),
        ("warmup:\n  generator_weights: {source: a/b}\n", "warmup.generator_weights.file: missing"),
        ("warmup:\n  t_star: abc\n", "warmup.t_star: 'abc' is not of type 'number'"),
        ("rewards:\n  eval: toy_aesthetic\n", "rewards.eval: 'toy_aesthetic' is not of type 'array'"),
        ("rewards:\n  eval: [toy_aesthetic, hpsv9]\n", "rewards.eval[1]: unknown reward 'hpsv9' (registered: "),
        ("rewards:\n  train: pickscor\n", "rewards.train: unknown reward 'pickscor'"),
        ("seed: true\n", "seed: True is not of type 'integer'"),
        ("experiment: a/b\n", "experiment: 'a/b' does not match"),
        ("- 1\n- 2\n", "expected a mapping at the top level"),
        ("grid:\n  seeds: [0]\n  methods: {didr: {beta: [0.1, -1]}}\n", "grid.methods.didr.beta[1]: -1 is less than"),
        ("grid:\n  seeds: [0]\n  methods: {dipp: {alpha: [-2]}}\n", "grid.methods.dipp.alpha[0]: -2 is less than"),
        ("grid:\n  seeds: [0]\n  methods: {didr: {beta: []}}\n", "grid.methods.didr.beta: no values"),
        ("grid:\n  seeds: []\n  methods: {di: {}}\n", "grid.seeds: no values"),
        (
            "grid:\n  seeds: [0]\n  methods: {dird: {beta: [1]}}\n",
            "grid.methods.dird: unknown key (known: acdmd, di, didr",
        ),
        ("grid:\n  seeds: [0]\n  methods: {didr: {beta: [1], gamma: [2]}}\n", "grid.methods.didr.gamma: unknown key"),
        ("grid:\n  seeds: [0]\n  methods: {didr: {drs_t_max: [0.5]}}\n", "grid.methods.didr.beta: missing"),
        ("grid:\n  seeds: [0]\n  methods: {}\n", "grid.methods: {} should be non-empty"),
        ("grid:\n  methods: {di: {}}\n", "grid.seeds: missing"),
    ],
)
def test_bad_params_name_the_file_and_the_key(tmp_path, text, key):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(str(path)) and key in message and "\n" not in message


def test_unreadable_params_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seed: 0 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        load_params(bad)


def test_prompt_files_fail_clearly(tmp_path):
    with pytest.raises(StageInputError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(StageInputError, match=f"{empty}: no prompts"):
        read_prompts(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a caf\xe9\n".encode("latin-1"))
    with pytest.raises(StageInputError, match=f"{latin}: not UTF-8"):
        read_prompts(latin)
    with pytest.raises(StageInputError, match=f"{tmp_path}: is a folder"):
        read_prompts(tmp_path)


@pytest.mark.parametrize("byte", ["\x00", "\x1b", "\x0c", "\x7f", "\x85"])
def test_prompts_with_control_bytes_are_rejected_naming_file_and_line(tmp_path, byte):
    path = tmp_path / "prompts.txt"
    path.write_text(f"a red circle\tat the top on white\nfine\nbad{byte}prompt\n", encoding="utf-8")
    with pytest.raises(StageInputError, match=rf"{path}: line 3 holds the control character {re.escape(repr(byte))}"):
        read_prompts(path)
    path.write_text("a red circle\tat the top\r\nsome words no model knows: zqxj\n", encoding="utf-8")
    assert read_prompts(path) == ["a red circle\tat the top", "some words no model knows: zqxj"]  # tab, CRLF: fine


def test_atomic_dir_leaves_nothing_behind_on_error_and_replaces_on_success(tmp_path):
    out = tmp_path / "stage"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    for text in ("first", "second"):
        with atomic_dir(out) as tmp:
            (tmp / "done.txt").write_text(text)
    assert (out / "done.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_atomic_dir_never_replaces_a_file_and_cleans_what_a_killed_writer_left(tmp_path):
    user_file = tmp_path / "f.txt"
    user_file.write_text("mine")
    with pytest.raises(ValueError, match=f"--out {user_file}: exists and is not a folder"), atomic_dir(user_file):
        raise AssertionError("the block must not run")
    assert user_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    out = tmp_path / "stage"
    stale = [tmp_path / ".stage.k1l2.tmp", tmp_path / ".stage.old", tmp_path / ".stage.x9.tmp"]
    for folder in stale:
        (folder / "sub").mkdir(parents=True)
    other = tmp_path / ".stages.a.tmp"  # another output's temporary: kept
    other.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "done.txt").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stages.a.tmp", "f.txt", "stage"]


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o007, 0o660, 0o770)])
def test_stage_outputs_are_as_readable_as_the_umask_allows(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "stage") as tmp:
            save_file({"w": torch.ones(2)}, tmp / "raw.safetensors")  # safetensors itself writes 0o600
            save_embeddings(Conditioning(["a"], {"h": torch.ones(1, 2)}, None), tmp / "embeddings", "train")
        save_weights(nn.Linear(2, 2), tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    out = tmp_path / "stage"
    assert out.stat().st_mode & 0o777 == dir_mode and (out / "embeddings").stat().st_mode & 0o777 == dir_mode
    for path in [out / "raw.safetensors", out / "embeddings" / "train-00000.safetensors", tmp_path / "w.safetensors"]:
        assert path.stat().st_mode & 0o777 == file_mode, path


def test_embedding_shards_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(
        [f"prompt {i}" for i in range(10)],
        {"hidden": torch.randn(10, 4, 8, generator=g), "pooled": torch.randn(10, 8, generator=g)},
        {"hidden": torch.zeros(10, 4, 8), "pooled": torch.ones(10, 8)},
    )
    paths = save_embeddings(cond, tmp_path, "train", shard_size=4)
    assert [p.name for p in paths] == ["train-00000.safetensors", "train-00001.safetensors", "train-00002.safetensors"]
    back = load_embeddings(tmp_path, "train")
    assert back.prompts == cond.prompts
    for key in cond.embeds:
        assert torch.equal(back.embeds[key], cond.embeds[key])
        assert torch.equal(back.negative[key], cond.negative[key])
    with pytest.raises(StageInputError, match="no 'eval' embedding shards"):
        load_embeddings(tmp_path, "eval")
    paths[1].write_bytes(paths[1].read_bytes()[:-7])
    with pytest.raises(StageInputError, match=f"{paths[1]}: not a readable embedding shard"):
        load_embeddings(tmp_path, "train")


def test_weights_of_another_shape_or_model_fail_naming_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(nn.Linear(3, 2), path)
    target = nn.Linear(3, 2)
    load_weights(target, path)
    with pytest.raises(StageInputError, match=f"{path}: weight has shape"):
        load_weights(nn.Linear(4, 2), path)
    with pytest.raises(StageInputError, match=f"{path}: weights of another model"):
        load_weights(nn.Sequential(nn.Linear(3, 2)), path)
    with pytest.raises(StageInputError, match="checkpoint not found"):
        load_weights(target, tmp_path / "none.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:20])
    with pytest.raises(StageInputError, match=f"{broken}: not a readable safetensors file"):
        load_weights(target, broken)


def test_pareto_front_and_hypervolume_by_hand():
    points = [(1.0, 1.0), (2.0, 3.0), (3.0, 2.0), (2.0, 3.0 - 1e-9)]
    assert pareto_front(points) == [0, 1]
    # union of [1, 4] x [0, 1] and [2, 4] x [0, 3]: 3 + 6 - 2 = 7
    assert hypervolume(points, reference=(4.0, 0.0)) == pytest.approx(7.0)
    assert hypervolume([(5.0, 9.0)], reference=(4.0, 0.0)) == 0.0  # worse cost than the reference: no area
    assert dominates([(1.0, 2.0), (2.0, 4.0)], [(1.5, 1.0), (2.0, 4.0)])
    assert not dominates([(1.0, 2.0)], [(0.5, 1.0)])
