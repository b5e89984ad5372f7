"""Real-data evaluation: the FID Inception (random weights through the real loader), reference features, FID / KID
against closed forms, and the real prompt sets."""

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tiny_models import random_inception_state

from didr.evaluation.fidelity import frechet_distance, kernel_distance
from didr.evaluation.inception import NAME, FeatureInputError, FIDInception, load_inception, preprocess
from didr.evaluation.reference import (
    Reference,
    build_reference,
    compute_features,
    image_paths,
    load_image,
    load_reference,
    save_reference,
)
from didr.stages.io import read_prompts

pytestmark = pytest.mark.integration  # the full-size FID Inception (random weights) against pytorch-fid

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts"


def _write_images(folder: Path, seed: int, sizes: list[tuple[int, int]]) -> None:
    """Smooth random colour fields of the given (width, height), as PNG."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for i, (width, height) in enumerate(sizes):
        field = F.interpolate(torch.rand(1, 3, 6, 6, generator=generator), size=(height, width), mode="bilinear")
        array = (field[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def model(weights) -> FIDInception:
    return load_inception(weights)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    _write_images(root / "real", 1, [(80, 60), (64, 64), (50, 90), (100, 100)])
    _write_images(root / "samples", 2, [(64, 64)] * 4)
    return root / "real", root / "samples"


@pytest.fixture(scope="module")
def reference(model, folders) -> Reference:
    return build_reference(folders[0], model, size=64, batch=3)


@pytest.fixture(scope="module")
def sample_features(model, folders) -> torch.Tensor:
    return compute_features(model, image_paths(folders[1]), size=64)


def test_random_weights_load_through_the_real_loader_and_give_finite_2048_features(weights, model, reference):
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    assert model.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert reference.features.shape == (4, 2048) and reference.features.dtype == torch.float32
    assert torch.isfinite(reference.features).all() and reference.features.std(0).mean() > 1e-3


def test_a_safetensors_conversion_loads_the_same_weights(weights, model, tmp_path):
    converted = tmp_path / "inception.safetensors"
    save_file(torch.load(weights, weights_only=True), converted)
    loaded = load_inception(converted)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())


@pytest.mark.parametrize("damage", ["missing", "garbage", "shape", "missing_key", "extra_key"])
def test_inception_weights_of_another_kind_give_a_one_line_error_naming_the_file(weights, tmp_path, damage):
    path = tmp_path / "weights.pth"
    state = torch.load(weights, weights_only=True)
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif damage != "missing":
        if damage == "shape":
            state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(192, 2048, 3, 3)
        elif damage == "missing_key":
            del state["Mixed_5b.branch1x1.bn.running_var"]
        else:
            state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
        torch.save(state, path)
    with pytest.raises(FeatureInputError) as error:
        load_inception(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Half-pixel bilinear interpolation weights [size_out, size_in]: source x = (i + 0.5) size_in / size_out - 0.5,
    clamped at 0, neighbours clamped at the last pixel."""
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        x = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        left = int(np.floor(x))
        weights[i, left] += 1 - (x - left)
        weights[i, min(left + 1, size_in - 1)] += x - left
    return weights


@pytest.mark.parametrize("shape", [(37, 64), (400, 333)])
def test_preprocessing_is_a_bilinear_resize_to_299_then_2x_minus_1(shape):
    images = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(3))
    rows, cols = _bilinear_matrix(shape[0], 299), _bilinear_matrix(shape[1], 299)
    expected = 2 * (rows @ images.double().numpy() @ cols.T) - 1
    # PyTorch computes source coordinates in float32: weights off by ~1e-7 x (coordinate up to 400)
    np.testing.assert_allclose(preprocess(images).numpy(), expected, rtol=0, atol=2e-4)


def test_features_equal_pytorch_fids_own_model_on_the_same_weights_file(weights, model, monkeypatch):
    inception = pytest.importorskip("pytorch_fid.inception")
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *_, **__: torch.load(weights, weights_only=True))
    theirs = inception.InceptionV3([3]).eval()  # resize_input and normalize_input on: pytorch-fid's defaults
    images = torch.rand(2, 3, 80, 100, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = theirs(images)[0][:, :, 0, 0]
        ours = model.features(images)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def _total_variance(features: torch.Tensor) -> float:
    return features.double().var(0).sum().item()


# FID's float64 floor here: square roots of the ~1e-16 relative round-off eigenvalues of rank-3 covariances in 2048-d
FID_TOLERANCE = 1e-5


def test_fid_of_a_reference_against_itself_is_zero(reference):
    fid = frechet_distance(reference.features.double(), reference.features.double())
    assert abs(fid) < FID_TOLERANCE * _total_variance(reference.features)


def test_fid_and_kid_against_a_reference_equal_closed_forms(reference, sample_features):
    """FID via the Gram trick: the non-zero eigenvalues of S_a S_b are the squared singular values of A B^T / c with
    A, B the centred features, so tr (S_a S_b)^(1/2) = ||A B^T||_* / sqrt((n_a - 1)(n_b - 1)); KID as the unbiased
    MMD^2 over whole sets (subsets larger than the sets are permutations of them)."""
    a, b = sample_features.double().numpy(), reference.features.double().numpy()
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a), len(b)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt((na - 1) * (nb - 1))
    fid = ((a.mean(0) - b.mean(0)) ** 2).sum() + (ca**2).sum() / (na - 1) + (cb**2).sum() / (nb - 1) - 2 * cross
    k_aa, k_bb, k_ab = ((x @ y.T / a.shape[1] + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    off = (k_aa.sum() - np.trace(k_aa)) / (na * (na - 1)) + (k_bb.sum() - np.trace(k_bb)) / (nb * (nb - 1))
    kid = off - 2 * k_ab.mean()
    ours, real = sample_features.double(), reference.features.double()
    kid_ours, kid_std = kernel_distance(ours, real, subsets=3)
    assert fid > 1e-3 * (ca**2).sum() / (na - 1)  # the two sets differ
    assert frechet_distance(ours, real) == pytest.approx(fid, abs=FID_TOLERANCE * _total_variance(reference.features))
    assert kid_ours == pytest.approx(kid, rel=1e-9)
    assert kid_std == pytest.approx(0, abs=1e-9 * abs(kid))


def test_a_reference_round_trips_with_its_metadata(model, reference, tmp_path):
    path = tmp_path / "ref" / "coco.safetensors"
    save_reference(reference, path)
    loaded = load_reference(path, model)
    assert torch.equal(loaded.features, reference.features)
    assert (loaded.extractor, loaded.weights_sha256, loaded.size) == (NAME, model.weights_sha256, 64)
    assert [p.name for p in path.parent.iterdir()] == ["coco.safetensors"]


@pytest.mark.parametrize("damage", ["missing", "truncated", "other_weights", "other_width", "count"])
def test_a_corrupted_or_mismatched_reference_gives_a_one_line_error_naming_the_file(model, reference, tmp_path, damage):
    path = tmp_path / "reference.safetensors"
    if damage == "other_weights":
        save_reference(Reference(reference.features, NAME, "0" * 64, 64), path)
    elif damage == "other_width":
        save_reference(Reference(reference.features[:, :64], NAME, model.weights_sha256, 64), path)
    elif damage != "missing":
        save_reference(reference, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "count":
        metadata = {"extractor": NAME, "weights_sha256": model.weights_sha256, "images": "5", "size": "64"}
        save_file({"features": reference.features}, path, metadata)
    with pytest.raises(FeatureInputError) as error:
        load_reference(path, model)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_images_come_from_a_sorted_folder_or_a_list_file_and_are_center_cropped(tmp_path, folders):
    real = folders[0]
    assert [p.name for p in image_paths(real)] == ["00.png", "01.png", "02.png", "03.png"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes((real / "01.png").read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text(f"\n{real / '02.png'}\nsub/a.png\n\n", encoding="utf-8")
    assert image_paths(listing) == [real / "02.png", tmp_path / "sub" / "a.png"]
    stripes = np.zeros((10, 30, 3), np.uint8)
    stripes[:, :10, 0], stripes[:, 10:20, 1], stripes[:, 20:, 2] = 255, 255, 255
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    expected = torch.zeros(3, 10, 10)
    expected[1] = 1
    assert torch.equal(load_image(tmp_path / "stripes.png", 10), expected)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureInputError, match="no images"):
        image_paths(tmp_path / "empty")


# file, prompts, whether all are distinct (COCO captions repeat across images, some HPSv2 prompts within a style)
PROMPT_SETS = [
    ("parti.txt", 1632, True),
    ("coco2014_val_30k.txt", 30000, False),
    ("hpsv2_anime.txt", 800, False),  # 781 distinct
    ("hpsv2_concept_art.txt", 800, False),  # 795 distinct
    ("hpsv2_paintings.txt", 800, False),  # 798 distinct
    ("hpsv2_photo.txt", 800, True),
]


@pytest.mark.parametrize(("name", "count", "distinct"), PROMPT_SETS)
def test_prompt_sets_read_with_their_stated_counts(name, count, distinct):
    path = PROMPTS / name
    lines = path.read_text(encoding="utf-8").split("\n")
    prompts = read_prompts(path)
    assert lines[-1] == "" and prompts == lines[:-1]  # no empty lines, no outer whitespace, newline-terminated
    assert len(prompts) == count and all("\t" not in p for p in prompts)
    assert (len(set(prompts)) == count) == distinct
    assert name in (PROMPTS / "SOURCES.md").read_text(encoding="utf-8")


def test_fetch_script_flattens_prompts_and_checks_hashes_and_counts():
    spec = importlib.util.spec_from_file_location("fetch_prompts", PROMPTS / "fetch_prompts.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    prompts = ["a cat\non a mat", " \t ", "\tdog\r\n"] + [f"prompt {i}" for i in range(798)]
    text = fetch.convert("hpsv2_photo", json.dumps(prompts).encode())
    assert text.splitlines()[:3] == ["a cat on a mat", "dog", "prompt 0"] and len(text.splitlines()) == 800
    with pytest.raises(ValueError, match="799 prompts"):
        fetch.convert("hpsv2_photo", json.dumps(prompts[1:]).encode())
    with pytest.raises(ValueError, match="sha256"):
        fetch.convert("parti", b"Prompt\tCategory\tChallenge\tNote\n")
    with pytest.raises(ValueError, match="sha256"):  # the GitHub copy of the HPSv2 sets is pinned
        fetch.convert("hpsv2_photo", json.dumps({"photo": prompts}).encode(), copy=True)
    assert fetch.COPIES["hpsv2_photo"][2](json.dumps({"anime": [], "photo": prompts})) == prompts
    with pytest.raises(ValueError, match="repeated JSON keys"):
        fetch.COPIES["hpsv2_photo"][2]('{"photo": [], "photo": []}')
