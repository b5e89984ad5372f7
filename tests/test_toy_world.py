"""The embedded world: data, tokenizer, a short teacher training through the project's adapter, sampling, grids."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import CLIPTokenizer

from didr.backbones.loading import denoiser_from_components, load_denoiser
from didr.evaluation.sampling import image_grid, sample_teacher, save_png
from didr.toy.data import all_labels, make_dataset, parse_prompt, prompt_of, prompt_sets, render
from didr.toy.teacher import build_toy_pipeline, fit_teacher, train_teacher
from didr.toy.text import WINDOW, WORDS, toy_text_encoder, toy_tokenizer

PROMPTS = ["a red circle at the left on black", "a cyan cross at the centre on white", ""]
SHORT = dict(steps=40, batch_size=8, lr=2e-3, seed=0, size=16, n_images=64, cfg_dropout=0.1, log_every=10)


# ---------------------------------------------------------------- data


def test_dataset_is_deterministic_in_its_seed():
    a, b, c = make_dataset(32, seed=0), make_dataset(32, seed=0), make_dataset(32, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.prompts == b.prompts
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (32, 3, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1


def test_shapes_mean_images_are_far_apart():
    """What a teacher must learn for the shape word at high noise is each shape's mean image over the jitter; with
    the former small shapes (radius 0.2-0.25 of the side) the closest pair, circle and square, was 0.06 apart (RMS),
    and the teacher drew blobs. Now every pair is at least 0.15 apart, circle-square the closest."""
    generator = torch.Generator().manual_seed(0)
    means = torch.stack([render(torch.tensor([[k, 0, 4, 0]] * 256), 16, generator).mean(0) for k in range(4)])
    distance = (means[:, None] - means[None]).pow(2).mean((2, 3, 4)).sqrt()
    apart = distance[~torch.eye(4, dtype=torch.bool)]
    assert apart.min() > 0.15 and distance[0, 1] == apart.min()


def test_parse_prompt_inverts_prompt_of_and_names_bad_prompts():
    for labels in all_labels():
        assert torch.equal(parse_prompt(prompt_of(labels)), labels)
    for bad in ["a red circle", "a purple circle at the left on black", "the red circle at the left on black"]:
        with pytest.raises(ValueError, match=bad):
            parse_prompt(bad)


def test_prompt_sets_are_disjoint_and_cover_every_combination():
    train, held_out = prompt_sets()
    assert not set(train) & set(held_out) and len(held_out) == 64
    assert sorted(train + held_out) == sorted(prompt_of(row) for row in all_labels())
    assert len(set(train + held_out)) == 360


# ---------------------------------------------------------------- text


def test_tokenizer_is_word_level_and_fits_every_prompt(tmp_path):
    tokenizer = toy_tokenizer()
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in WORDS)
    prompts = [prompt_of(row) for row in all_labels()]
    assert max(len(ids) for ids in tokenizer(prompts)["input_ids"]) <= WINDOW
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert len(ids) == 10 and tokenizer.decode(ids, skip_special_tokens=True) == PROMPTS[0]
    assert len(tokenizer("zebra")["input_ids"]) == 7  # an unknown word falls back to its letters
    tokenizer.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again(prompts)["input_ids"] == tokenizer(prompts)["input_ids"]
    assert again.model_max_length == WINDOW


def test_text_encoder_is_seeded():
    tokenizer = toy_tokenizer()
    a, b = toy_text_encoder(tokenizer, seed=3), toy_text_encoder(tokenizer, seed=3)
    c = toy_text_encoder(tokenizer, projection=True, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)


# ---------------------------------------------------------------- teacher


@pytest.fixture(scope="module", params=["vp", "flow"])
def trained(request, tmp_path_factory):
    """(kind, folder, record, in-memory pipeline) of a 40-step training, run twice: saved and in memory."""
    folder = tmp_path_factory.mktemp(request.param) / "teacher"
    record = train_teacher(request.param, folder, progress=False, **SHORT)
    pipe, _ = fit_teacher(request.param, progress=False, **SHORT)
    return request.param, folder, record, pipe


def test_teacher_loss_decreases(trained):
    kind, folder, record, _ = trained
    losses = [entry["loss"] for entry in record["losses"]]
    assert [entry["step"] for entry in record["losses"]] == [10, 20, 30, 40]
    assert losses[-1] < 0.7 * losses[0], losses
    saved = json.loads((folder / "training.json").read_text())
    assert saved["params"]["kind"] == kind and saved["losses"] == record["losses"]


def test_teacher_saved_atomically_loads_with_identical_x0(trained):
    _, folder, _, pipe = trained
    assert sorted(p.name for p in folder.parent.iterdir()) == ["teacher"]  # no staging folder left
    loaded = load_denoiser(folder).frozen()
    memory = denoiser_from_components(type(pipe).__name__, pipe.components).frozen()
    x = torch.randn(3, *loaded.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.6, 1.0])
    for guidance in (1.0, 3.0):
        assert torch.equal(
            loaded.x0(x, t, loaded.encode_prompts(PROMPTS), guidance),
            memory.x0(x, t, memory.encode_prompts(PROMPTS), guidance),
        )


def test_failed_save_leaves_the_old_teacher(tmp_path, monkeypatch):
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "old.txt").write_text("kept")

    def broken(self, folder, **kwargs):
        (folder / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        train_teacher("vp", out, progress=False, **{**SHORT, "steps": 1, "batch_size": 2, "n_images": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_bad_teacher_arguments_are_named():
    with pytest.raises(ValueError, match="'dit'"):
        build_toy_pipeline("dit")
    with pytest.raises(ValueError, match="cfg_dropout=1"):
        fit_teacher("vp", progress=False, **{**SHORT, "cfg_dropout": 1})


def test_every_toy_prompt_fits_the_teachers_window(trained):
    _, folder, _, _ = trained
    teacher = load_denoiser(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher.encode_prompts([prompt_of(row) for row in all_labels()])
    with pytest.warns(UserWarning, match="truncated"):
        teacher.encode_prompts([PROMPTS[0] + " and a blue square at the top on gray"])


# ---------------------------------------------------------------- sampling


def test_sample_teacher_shapes_determinism_and_one_step_closed_form(trained):
    _, folder, _, _ = trained
    teacher = load_denoiser(folder).frozen()
    cond = teacher.encode_prompts(PROMPTS)

    def sample(seed: int, steps: int = 4, guidance: float = 3.0) -> torch.Tensor:
        return sample_teacher(teacher, cond, steps, guidance, torch.Generator().manual_seed(seed))

    a = sample(0)
    assert a.shape == (3, *teacher.sample_shape) and not a.requires_grad
    assert torch.equal(a, sample(0)) and not torch.equal(a, sample(1))
    x1 = torch.randn(3, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher.x0(x1, torch.ones(3), cond, 3.0)
    assert torch.equal(sample(0, steps=1), expected)
    assert torch.equal(sample_teacher(teacher, cond, 4, 3.0, x1), a)  # the noise itself may be given
    with pytest.raises(ValueError, match="noise of shape"):
        sample_teacher(teacher, cond, 4, 3.0, x1[:2])


def test_image_grid_layout_and_png(tmp_path):
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.5, 0.5, 0.5]])
    images = colours[:, :, None, None].expand(5, 3, 2, 4).clone()
    images[0, :, 0, 0] = 1.0  # one white pixel in the first image's corner
    grid = image_grid(images, nrow=2, scale=3)
    assert grid.size == (2 * 4 * 3, 3 * 2 * 3)
    pixels = torch.from_numpy(np.array(grid)).permute(2, 0, 1)
    for i, colour in enumerate(colours):
        r, c = divmod(i, 2)
        cell = pixels[:, r * 6 : (r + 1) * 6, c * 12 : (c + 1) * 12]
        expected = (colour * 255).round().to(torch.uint8)[:, None]
        assert torch.equal(cell[:, 3:, :].flatten(1), expected.expand(3, 36))
    assert torch.equal(pixels[:, :3, :3].flatten(1), torch.full((3, 9), 255, dtype=torch.uint8))
    assert torch.equal(pixels[:, 12:, 12:], torch.zeros(3, 6, 12, dtype=torch.uint8))  # the empty sixth cell
    save_png(images[4], tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as png:
        assert png.mode == "RGB" and png.size == (4, 2) and png.getpixel((0, 0)) == (128, 128, 128)
