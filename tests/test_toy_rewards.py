"""Toy rewards (alignment scorer, preference model, aesthetic, hidden utility) and the reward registry."""

import json
import math

import pytest
import torch

from didr.plugins import load_plugins
from didr.rewards.registry import RewardMixture, build_reward, known_rewards, register_reward, reward_statistics
from didr.toy import rewards as toy
from didr.toy.data import make_dataset, prompt_of, render

load_plugins()  # the toy rewards register themselves

SIZE = 16


@pytest.fixture(scope="module")
def trained():
    """Briefly trained models (a few seconds each): 250 alignment steps, 150 preference steps."""
    alignment, alignment_metrics = toy.train_alignment(SIZE, seed=0, steps=250)
    preference, preference_metrics = toy.train_preference(SIZE, seed=0, steps=150)
    return {"alignment": (alignment, alignment_metrics), "preference": (preference, preference_metrics)}


@pytest.fixture(scope="module")
def folder(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards")
    for name, (model, _) in trained.items():
        toy.save_toy_reward(model, path / name)
    return path


@pytest.fixture(scope="module")
def data():
    d = make_dataset(32, SIZE, seed=123)
    return (d.images + 1) / 2, d.prompts


@pytest.mark.parametrize("name", ["toy_alignment", "toy_preference", "toy_aesthetic", "toy_utility"])
def test_gradients_reach_the_images(name, folder, data):
    images, prompts = data
    x = images[:4].clone().requires_grad_(True)
    build_reward(name, folder=folder)(x, prompts[:4]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_rewards_take_other_resolutions(folder, data):
    images, prompts = data
    big = torch.nn.functional.interpolate(images[:4], size=(32, 32), mode="nearest")
    for name in ("toy_alignment", "toy_preference", "toy_utility"):
        assert build_reward(name, folder=folder)(big, prompts[:4]).shape == (4,)


def test_aesthetic_is_mean_chroma_plus_luma_std_on_a_hand_made_image():
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0, 0, :] = 1.0  # top row red, bottom row black
    chroma = (1 + 1 + 0 + 0) / 4
    luma = [0.299, 0.299, 0.0, 0.0]
    mean = sum(luma) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in luma) / 3)
    assert toy.AestheticReward()(image).item() == pytest.approx(chroma + std, abs=1e-6)


def test_alignment_scorer_learns_and_prefers_the_matching_colour(trained):
    model, metrics = trained["alignment"]
    # 250 steps: colour, position and background are learned (chance 1/6, 1/5, 1/3); shape lags (chance 1/4)
    for attribute in ("colour", "position", "background"):
        assert metrics[f"accuracy_clean_{attribute}"] >= 0.95
        assert metrics[f"accuracy_augmented_{attribute}"] >= 0.9
    assert metrics["accuracy_clean_shape"] > 0.4
    labels = torch.tensor([[0, 0, 4, 0], [1, 2, 0, 1], [2, 3, 1, 2], [3, 5, 2, 0]])  # red, blue, yellow, cyan
    wrong = labels.clone()
    wrong[:, 1] = (wrong[:, 1] + 1) % 6
    prompts = [prompt_of(row) for row in labels]
    generator = torch.Generator().manual_seed(0)
    matching = (render(labels, SIZE, generator) + 1) / 2
    mismatched = (render(wrong, SIZE, generator) + 1) / 2
    assert (model(matching, prompts) > model(mismatched, prompts)).all()
    features = model.features(matching)
    assert features.shape == (4, model.config["features"])


def test_hidden_utility_prefers_clean_aligned_images(data):
    images, prompts = data
    utility = toy.HiddenUtility(SIZE)
    clean = utility(images, prompts)
    noisy = utility(
        (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1), prompts
    )
    blurred = utility(toy.blur(toy.blur(images)), prompts)
    assert (clean > noisy).float().mean() > 0.9 and (clean > blurred).float().mean() > 0.9


def test_preference_training_lowers_the_loss_and_orders_held_out_pairs(trained):
    _, metrics = trained["preference"]
    assert metrics["bt_loss_final"] < metrics["bt_loss_initial"] - 0.03
    assert metrics["pair_accuracy_utility"] > 0.62  # chance 0.5
    assert metrics["pair_accuracy_human"] > 0.58  # ceiling ~0.75 from the logistic noise
    assert 0.7 < metrics["pair_accuracy_human_ceiling"] < 0.8


def test_preference_model_is_hackable(trained):
    """Gradient ascent raises its score while the hidden utility collapses: oversaturation, high frequencies."""
    report = toy.hack_report(trained["preference"][0], SIZE, steps=100)
    assert report["score_after"] > report["score_before"] + 0.5
    assert report["utility_after"] < report["utility_before"] - 2
    assert report["saturation_after"] > 2 * report["saturation_before"]  # from 0.30 on the large shapes
    assert report["high_frequency_after"] > 3 * report["high_frequency_before"]


def test_save_load_round_trip_gives_identical_scores(trained, folder, data):
    images, prompts = data
    for name, (model, _) in trained.items():
        loaded = toy.load_toy_reward(name, folder)
        assert torch.equal(loaded(images, prompts), model(images, prompts))
        assert not any(p.requires_grad for p in loaded.parameters())
    config = json.loads((folder / "alignment" / "config.json").read_text())
    assert config["kind"] == "alignment" and config["vocab"]["colour"][0] == "red"


def test_load_refuses_unknown_names_and_other_vocabularies(trained, tmp_path):
    with pytest.raises(ValueError, match="'clip'"):
        toy.load_toy_reward("clip", tmp_path)
    toy.save_toy_reward(trained["alignment"][0], tmp_path / "alignment")
    path = tmp_path / "alignment" / "config.json"
    config = json.loads(path.read_text())
    config["vocab"]["colour"] = ["red"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="another toy vocabulary"):
        toy.load_toy_reward("alignment", tmp_path)


def test_train_toy_rewards_writes_atomically_and_replaces(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "train_alignment", lambda size, seed, steps: trained["alignment"])
    monkeypatch.setattr(toy, "train_preference", lambda size, seed, steps: trained["preference"])
    monkeypatch.setattr(toy, "hack_report", lambda model, size, seed: {"score_after": 1.0})
    out = tmp_path / "rewards"
    for _ in range(2):  # the second run replaces the first
        metrics = toy.train_toy_rewards(out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rewards"]
    assert sorted(p.name for p in out.iterdir()) == ["alignment", "metrics.json", "preference"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert torch.get_num_threads() == 1  # conftest's setting, restored
    images, prompts = make_dataset(4, SIZE, seed=5).images, make_dataset(4, SIZE, seed=5).prompts
    assert build_reward("toy_preference", folder=out)((images + 1) / 2, prompts).shape == (4,)


def test_registry_builds_by_name_and_names_unknown_ones(folder):
    assert {"toy_alignment", "toy_preference", "toy_aesthetic", "toy_utility"} <= set(known_rewards())
    assert isinstance(build_reward("toy_aesthetic"), toy.AestheticReward)
    assert isinstance(build_reward("toy_alignment", folder=folder), toy.AlignmentScorer)
    with pytest.raises(ValueError, match=r"'hpsv9'.*toy_aesthetic.*toy_preference"):
        build_reward("hpsv9")
    register_reward("test_constant", lambda value=1.0: lambda images, prompts: torch.full((len(images),), value))
    assert build_reward("test_constant", value=2.5)(torch.zeros(3, 3, 4, 4), ["a"] * 3).tolist() == [2.5] * 3


def test_mixture_normalises_and_weights_by_hand():
    images = torch.tensor([0.0, 1.0, 2.0, 3.0])[:, None, None, None].expand(4, 3, 2, 2)
    first = lambda x, p: x.mean((1, 2, 3))  # 0, 1, 2, 3  # noqa: E731
    second = lambda x, p: 10 * x.mean((1, 2, 3)) ** 2  # 0, 10, 40, 90  # noqa: E731
    prompts = ["p"] * 4
    mean, std = reward_statistics(second, images, prompts)
    assert mean == pytest.approx(35.0) and std == pytest.approx(math.sqrt((35**2 + 25**2 + 5**2 + 55**2) / 3))
    mixture = RewardMixture({"a": first, "b": second}, {"a": 2.0, "b": -0.5}, {"a": (1.0, 2.0), "b": (35.0, 10.0)})
    expected = [2 * (v - 1) / 2 - 0.5 * (w - 35) / 10 for v, w in zip([0, 1, 2, 3], [0, 10, 40, 90], strict=True)]
    assert mixture(images, prompts).tolist() == pytest.approx(expected)
    plain = RewardMixture({"a": first, "b": second}, {"a": 1.0, "b": 1.0})
    assert plain(images, prompts).tolist() == pytest.approx([0, 11, 42, 93])
    with pytest.raises(ValueError, match="weights"):
        RewardMixture({"a": first}, {"b": 1.0})
    with pytest.raises(ValueError, match="std of 'a'"):
        RewardMixture({"a": first}, {"a": 1.0}, {"a": (0.0, 0.0)})
