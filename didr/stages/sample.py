"""Stage `sample`: evaluation images from a one- or few-step generator, or from the teacher with N steps and CFG."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from didr.config import Params
from didr.evaluation.sampling import sample_teacher, save_png
from didr.stages.common import load_generator, load_prompts, load_teacher, pick_device, read_run_params
from didr.stages.io import write_text_atomic
from didr.training.atomic import atomic_dir


def run_sample(
    params: Params,
    teacher_dir: Path,
    out: Path,
    generator_dir: Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> None:
    """out/images/NNNNN.png and out/index.parquet (prompt, seed, path, method, setting).

    Image i of every sample set uses the same prompt and the same initial noise (drawn from `sample.seed`), so
    grids line up across methods. Without `generator_dir` the teacher samples with `sample.teacher_steps` steps
    and CFG `sample.teacher_guidance` (the reference). A K-step generator (warmup.generator.steps K > 1) samples
    with its deterministic K-step forward (§8.1) and its method reads "<method> (K-step)" ("K-step (warm start)"),
    so the report's tables and Pareto plots show its step count; params.json records the network evaluations per
    image (`nfe`) and, for a run's snapshot (align.evaluate_at), the run id, the step and the run's final step.
    """
    dev = pick_device(device)
    teacher = load_teacher(teacher_dir, dev)
    prompts = load_prompts(teacher_dir, "eval", dev)
    s = params.sample
    index = torch.arange(len(prompts)).repeat_interleave(s.per_prompt)
    noise = torch.randn((len(index), *teacher.sample_shape), generator=torch.Generator().manual_seed(s.seed))
    if generator_dir is None:
        method, setting = "teacher", f"steps={s.teacher_steps},cfg={s.teacher_guidance}"
        nfe = s.teacher_steps * (1 if s.teacher_guidance == 1 else 2)
    else:
        run = read_run_params(generator_dir)
        nfe = run["generator"].get("steps", 1)
        if nfe == 1:
            method = run.get("method", "one-step (warm start)")
            setting = run.get("setting", f"t_star={run['generator']['t_star']}")
        else:
            method = f"{run['method']} ({nfe}-step)" if "method" in run else f"{nfe}-step (warm start)"
            setting = run.get("setting", f"{run['generator']['sampler']},eta={run['generator']['eta']}")
        generator = load_generator(teacher, generator_dir)
    rows = []
    with atomic_dir(out) as tmp, torch.no_grad():
        (tmp / "images").mkdir()
        for start in range(0, len(index), batch_size):
            part = index[start : start + batch_size]
            cond = prompts.select(part.to(dev))
            z = noise[start : start + batch_size].to(dev)
            if generator_dir is None:
                x0 = sample_teacher(teacher, cond, s.teacher_steps, s.teacher_guidance, z)
            else:
                x0 = generator(z, cond)
            images = teacher.decode(x0).clamp(0, 1).cpu()
            for offset, image in enumerate(images):
                i = start + offset
                path = f"images/{i:05d}.png"
                save_png(image, tmp / path)
                rows.append({"prompt": cond.prompts[offset], "seed": s.seed, "index": i, "path": path,
                             "method": method, "setting": setting})  # fmt: skip
        pd.DataFrame(rows).to_parquet(tmp / "index.parquet")
        strength = None if generator_dir is None else run.get("strength")
        record = {
            "stage": "sample",
            "method": method,
            "setting": setting,
            "strength": strength,
            "nfe": nfe,
            "params": asdict(params),
        }
        if generator_dir is not None and "step" in run:  # a snapshot: the report's reward and fidelity over training
            record |= {"run": run["run"], "step": run["step"], "final_step": run["params"]["align"]["steps"]}
        write_text_atomic(tmp / "params.json", json.dumps(record, indent=1))
