"""Stage `export`: an align run as a diffusers pipeline folder with a model card (didr/export.py, docs/export.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
import yaml

from didr.backbones.adapter import DiffusersDenoiser
from didr.backbones.loading import denoiser_from_components, resolve_source, vae_scale_factor
from didr.config import Params
from didr.export import (
    LORA_MODES,
    absent_components,
    check_pipeline,
    generator_times,
    model_card,
    params_digest,
    pipeline_arguments,
    sampler_scheduler,
    usage_snippet,
    write_export,
)
from didr.stages.common import generator_record, new_generator, read_run_params
from didr.stages.io import StageInputError, load_weights, read_prompts
from didr.training.atomic import atomic_dir

PROJECT_LICENCE = "apache-2.0"  # the licence of the embedded world's teacher, trained by this project (pyproject.toml)


def check_export_inputs(run_dir: Path, scores_dir: Path, out: Path) -> None:
    """StageInputError naming the path when the run or its scores are missing, or `out` is not an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StageInputError(f"--out {out}: exists and is not an empty folder; export into a new one")
    for path in (run_dir / "params.json", run_dir / "generator.safetensors"):
        if not path.is_file():
            raise StageInputError(f"--run {run_dir}: not an align run ({path.name} missing; run `didr align` first)")
    if not (scores_dir / "summary.json").is_file():
        raise StageInputError(f"--scores {scores_dir}: no summary.json (run `didr score` on the run's samples first)")


def base_licence(folder: Path, embedded: bool) -> str:
    """The base model's licence: this project's for the embedded world, else the `license` of the pipeline's own
    model card (README.md), 'other' when it names none."""
    if embedded:
        return PROJECT_LICENCE
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    meta = yaml.safe_load(text.split("---\n")[1]) if text.startswith("---\n") and text.count("---\n") >= 2 else None
    return str(meta.get("license", "other")) if isinstance(meta, dict) else "other"


def run_export(params: Params, teacher_dir: Path, run_dir: Path, scores_dir: Path, out: Path) -> None:
    """out/: the teacher's pipeline with the run's generator network and the scheduler of its one- or K-step
    sampler (safetensors), its call arguments and README.md (YAML metadata: base model and revision, method and
    settings, params digest, the run's metrics as the report's table holds them, licence; a usage snippet). Inputs
    are checked before anything is written."""
    from diffusers import DiffusionPipeline

    check_export_inputs(run_dir, scores_dir, out)
    lora = params.export.lora
    if lora not in LORA_MODES:
        raise StageInputError(f"export.lora: unknown value {lora!r}; choose one of {list(LORA_MODES)}")
    run, teacher = read_run_params(run_dir), read_run_params(teacher_dir)["params"]["teacher"]
    if lora == "keep" and run["params"]["finetune"]["lora_rank"] == 0:
        raise StageInputError(f"export.lora: keep needs a LoRA run; {run_dir} fine-tuned every weight (lora_rank 0)")
    embedded = teacher["kind"] != "pretrained"
    folder = teacher_dir / "pipeline" if embedded else resolve_source(teacher["source"], teacher["revision"])
    absent = absent_components(folder)
    pipe = DiffusionPipeline.from_pretrained(folder, **absent)
    check_pipeline(type(pipe).__name__, str(folder / "model_index.json"))
    adapter = denoiser_from_components(type(pipe).__name__, pipe.components, "fp32", pipe.config)
    generator = new_generator(adapter, run["params"])
    load_weights(generator, run_dir / "generator.safetensors")
    if generator.guidance != 1.0:
        raise StageInputError(f"{run_dir}: a generator with its own guidance {generator.guidance} cannot be exported")
    scheduler, call = sampler_scheduler(pipe.scheduler.config, adapter.schedule, generator_times(generator))
    vae, (_, height, width) = adapter.frozen_parts.vae, adapter.sample_shape
    scale = 1 if vae is None else vae_scale_factor(vae)  # pixels per sample element
    call.update(
        pipeline_arguments(type(pipe).__name__, adapter.frozen_parts.text.towers, (scale * height, scale * width))
    )
    required = [name for name in absent if name not in type(pipe)._optional_components]
    summary = json.loads((scores_dir / "summary.json").read_text(encoding="utf-8"))
    metrics = {key: value for key, value in summary.items() if isinstance(value, int | float)}
    meta = card_metadata(run, teacher, teacher_dir, folder, embedded, call, metrics, lora, generator_record(generator))
    prompt = read_prompts(Path(run["params"]["prompts"]["eval"]))[0]
    snippet = usage_snippet(str(out), prompt, call, lora == "keep", required, adapter.frozen_parts.vae is None)
    card = model_card(meta, snippet, f"{run.get('method', 'warm start')} {run.get('setting', '')}".strip())
    with atomic_dir(out) as tmp, torch.no_grad():
        write_export(pipe, cast("DiffusersDenoiser", generator.body).net, scheduler, call, lora, tmp, card)


def card_metadata(
    run: dict[str, Any],
    teacher: dict[str, Any],
    teacher_dir: Path,
    folder: Path,
    embedded: bool,
    call: dict[str, Any],
    metrics: dict[str, Any],
    lora: str,
    sampler: dict[str, Any],
) -> dict[str, Any]:
    """The model card's YAML: the Hub's keys (base model, licence, library, tags) and didr's own (run, sampler
    steps and times (`sampler`, generator_record's), settings, params digest, metrics, call)."""
    params = run["params"]
    method = run.get("method", "warm start")
    return {
        "base_model": str(folder) if embedded else teacher["source"],
        "base_model_revision": params_digest(read_run_params(teacher_dir)["params"])
        if embedded
        else teacher["revision"],
        "license": base_licence(folder, embedded),
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["didr", "one-step" if sampler["steps"] == 1 else "few-step", str(method)],
        "didr": {
            "method": method,
            "run": run.get("run", ""),
            "setting": run.get("setting", ""),
            "strength": run.get("strength"),
            "seed": run.get("seed"),
            **{key: sampler[key] for key in ("steps", "t_star", "times") if key in sampler},  # deterministic: no eta
            "lora": lora if params["finetune"]["lora_rank"] > 0 else "none (full fine-tuning)",
            "params_digest": params_digest(params),
            "settings": {key: params[key] for key in ("align", "finetune", "warmup", "rewards")},
            "metrics": metrics,
            "call": call,
        },
    }
