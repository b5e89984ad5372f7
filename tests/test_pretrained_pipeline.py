"""The six stages through the `didr` command on a pretrained teacher, as the model-zoo presets run them, with tiny
random models of the real classes saved like hub snapshots: an SDXL pipeline, initial generator weights in a torch
state-dict file (as DMD2 ships its one-step UNet), PickScore / CLIP-score CLIP towers, FID Inception weights and a
reference built from real PNG files by `didr reference`; LoRA with gradient checkpointing."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import random_inception_state, save_clip_model, save_sdxl

from didr.backbones.loading import load_denoiser
from didr.cli import main

pytestmark = pytest.mark.integration  # the six stages on tiny SDXL, CLIP and Inception models

PROMPTS = ["red cat", "blue dog", "green tree", "a yellow sun"]
T_STAR = 0.3993994  # timestep 399 of 1000, where DMD2's one-step SDXL generator reads its noise


def run(*args: str) -> int:
    return main([*args, "--quiet"])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Tiny pretrained models on disk, a params file for them, and the teacher and warm-up stages run once."""
    root = tmp_path_factory.mktemp("zoo")
    save_sdxl(root / "sdxl")
    save_sdxl(root / "other", seed=1)
    torch.save(load_denoiser(root / "other").net.state_dict(), root / "one_step_unet.bin")
    save_clip_model(root / "clip")
    save_file(random_inception_state(), root / "inception.safetensors")
    real = root / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(real / f"{i}.png")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    clip = {"weights": str(root / "clip"), "revision": None}
    params = {
        "experiment": "zoo",
        "teacher": {"kind": "pretrained", "source": str(root / "sdxl"), "precision": "fp32"},
        "finetune": {"lora_rank": 4, "gradient_checkpointing": True},
        "prompts": {"train": str(root / "prompts.txt"), "eval": str(root / "prompts.txt")},
        "rewards": {
            "train": "pickscore",
            "eval": ["pickscore", "clip_score"],
            "models": {"pickscore": {**clip, "tokenizer": str(root / "clip")}, "clip_score": clip},
        },
        "warmup": {"t_star": T_STAR, "steps": 2, "batch_size": 2,
                   "generator_weights": {"file": str(root / "one_step_unet.bin")}},
        "align": {"steps": 2, "batch_size": 2, "fake_updates": 1, "checkpoint_every": 1, "teacher_guidance": 3.0},
        "sample": {"per_prompt": 1, "teacher_steps": 2},
        "score": {"features": "inception", "inception": str(root / "inception.safetensors"),
                  "reference": str(root / "reference.safetensors")},
        "grid": {"seeds": [0], "methods": {"didr": {"beta": [1.0]}}},
    }  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    p = ["--params", str(root / "params.yaml")]
    assert run("teacher", *p, "--out", str(root / "teacher")) == 0
    assert run("warmup", *p, "--teacher", str(root / "teacher"), "--out", str(root / "warmup")) == 0
    return root, p


def test_teacher_stage_pins_the_source_and_caches_sdxl_embeddings(zoo):
    root, _ = zoo
    record = json.loads((root / "teacher" / "params.json").read_text())
    assert record["model"] == {"source": str(root / "sdxl"), "revision": None, "folder": str(root / "sdxl")}
    assert not (root / "teacher" / "pipeline").exists()  # pinned, not copied
    embeds = load_file(root / "teacher" / "embeddings" / "train-00000.safetensors")
    assert embeds["embeds.hidden"].shape == (4, 16, 48) and embeds["embeds.pooled"].shape == (4, 32)  # CLIP 16 + 32
    assert not embeds["negative.hidden"].any()  # SDXL's zeroed empty prompt (force_zeros_for_empty_prompt)


def test_warm_start_is_the_given_weights_with_lora_adapters_only(zoo):
    root, _ = zoo
    saved = load_file(root / "warmup" / "generator.safetensors")
    assert saved and all("lora_" in key for key in saved)
    teacher, other = load_denoiser(root / "sdxl").frozen(), load_denoiser(root / "other").frozen()
    from didr.stages.common import load_generator

    generator = load_generator(teacher, root / "warmup")
    cond = teacher.encode_prompts(PROMPTS[:2])
    z = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), T_STAR)
    with torch.no_grad():
        ours = generator(z, cond)
        torch.testing.assert_close(ours, other.x0(z, t, cond), rtol=1e-5, atol=1e-5)
        assert (ours - teacher.x0(z, t, cond)).abs().max() > 1e-2


def test_align_sample_reference_score_report(zoo, tmp_path):
    root, p = zoo
    teacher = str(root / "teacher")
    aligned = tmp_path / "align"
    assert run("align", *p, "--teacher", teacher, "--warmup", str(root / "warmup"), "--out", str(aligned),
               "--method", "didr", "--strength", "1") == 0  # fmt: skip
    metrics = pd.read_parquet(aligned / "metrics.parquet")
    assert metrics["step"].tolist() == [0, 1] and np.isfinite(metrics["loss"]).all() and metrics["drs_norm"].max() > 0
    assert all("lora_" in key for key in load_file(aligned / "generator.safetensors"))
    for name, generator in {"teacher": [], "didr": ["--generator", str(aligned)]}.items():
        assert run("sample", *p, "--teacher", teacher, *generator, "--out", str(tmp_path / f"samples-{name}")) == 0
        index = pd.read_parquet(tmp_path / f"samples-{name}" / "index.parquet")
        assert index["prompt"].tolist() == PROMPTS
        assert Image.open(tmp_path / f"samples-{name}" / index["path"][0]).size == (16, 16)  # VAE-decoded 8 x 8

    assert main(["reference", "--images", str(root / "real"), "--inception", str(root / "inception.safetensors"),
                 "--size", "16", "--out", str(root / "reference.safetensors"), "--device", "cpu"]) == 0  # fmt: skip
    assert load_file(root / "reference.safetensors")["features"].shape == (6, 2048)
    for name in ("teacher", "didr"):
        samples, out = str(tmp_path / f"samples-{name}"), str(tmp_path / f"score-{name}")
        reference = str(tmp_path / "samples-teacher")
        assert run("score", *p, "--teacher", teacher, "--samples", samples, "--reference", reference, "--out", out) == 0
    teacher_summary = json.loads((tmp_path / "score-teacher" / "summary.json").read_text())
    summary = json.loads((tmp_path / "score-didr" / "summary.json").read_text())
    assert summary["features"].startswith("pytorch-fid-inception-v3-pool3 sha256:")
    # the reference set against itself: zero up to float64 round-off (4 images in 2048 dimensions)
    assert abs(teacher_summary["fid_teacher"]) < 1e-3 * summary["fid_teacher"]
    assert summary["fid_real"] > 0 and summary["kid_teacher"] > 0
    per_image = pd.read_parquet(tmp_path / "score-didr" / "per_image.parquet")
    assert np.isfinite(per_image[["pickscore", "clip_score"]].to_numpy()).all()
    assert summary["pickscore_mean"] == pytest.approx(per_image["pickscore"].mean())
    assert main(["report", *p, "--scores", str(tmp_path / "score-teacher"), str(tmp_path / "score-didr"),
                 "--samples", str(tmp_path / "samples-teacher"), str(tmp_path / "samples-didr"),
                 "--out", str(tmp_path / "report")]) == 0  # fmt: skip
    assert (tmp_path / "report" / "pareto_pickscore.png").stat().st_size > 1000
