"""Prompt following of the toy teacher: how often its multi-step CFG samples show their prompt's attributes (issue 3).

For each training seed, trains the embedded teacher exactly as the `teacher` stage does (the teacher section of the
params file, through `fit_teacher`), draws `per_prompt` samples for each evaluation prompt (the `sample` section's
solver steps, guidance and seed) and reads them with a `toy_alignment` classifier trained once here (the params
file's reward seed and steps). Per seed: the accuracy per attribute, the shape confusion and the training seconds.
The spread over seeds is the point: one training can land far from another.
Results are appended to benchmarks/RESULTS.md with the machine and the date.

Run: python benchmarks/teacher_fidelity.py [--params params.yaml] [--kind vp] [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
from results import append_section

from didr.backbones.loading import denoiser_from_components
from didr.config import load_params
from didr.evaluation.sampling import sample_teacher
from didr.stages.io import read_prompts
from didr.toy.data import ATTRIBUTES, VOCAB, parse_prompt
from didr.toy.rewards import train_alignment
from didr.toy.teacher import fit_teacher


def measure(params, kind: str, seed: int, scorer, prompts: list[str]) -> dict:
    """Train one teacher with `seed`; its samples' per-attribute accuracy, shape confusion and training seconds."""
    t, s = params.teacher, params.sample
    started = time.perf_counter()
    pipe, _ = fit_teacher(
        kind, steps=t.steps, batch_size=t.batch_size, lr=t.lr, seed=seed, size=t.size, n_images=t.n_images,
        cfg_dropout=0.1, log_every=t.steps, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    teacher = denoiser_from_components(type(pipe).__name__, pipe.components).frozen()
    generator = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        x = sample_teacher(teacher, teacher.encode_prompts(prompts), s.teacher_steps, s.teacher_guidance, generator)
        read = torch.stack([lg.argmax(1) for lg in scorer.logits(teacher.decode(x))], 1)
    labels = torch.stack([parse_prompt(p) for p in prompts])
    confusion = torch.zeros(len(VOCAB["shape"]), len(VOCAB["shape"]), dtype=torch.long)
    confusion.index_put_((labels[:, 0], read[:, 0]), torch.ones(len(prompts), dtype=torch.long), accumulate=True)
    accuracy = {a: (read[:, i] == labels[:, i]).float().mean().item() for i, a in enumerate(ATTRIBUTES)}
    return {"seed": seed, "seconds": seconds, "accuracy": accuracy, "confusion": confusion.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--kind", choices=("vp", "flow"), help="default: the params file's teacher.kind")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    kind = args.kind or params.teacher.kind
    prompts = [p for p in read_prompts(Path(params.prompts.eval)) for _ in range(params.sample.per_prompt)]
    scorer, scorer_metrics = train_alignment(params.teacher.size, params.teacher.reward_seed,
                                             steps=params.teacher.reward_alignment_steps)  # fmt: skip
    results = []
    for seed in args.seeds:
        results.append(measure(params, kind, seed, scorer, prompts))
        print(results[-1], flush=True)

    t, s = params.teacher, params.sample
    lines = [
        f"## Toy teacher prompt following ({kind}), {datetime.date.today()}",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or platform.platform()}, {args.threads} torch "
        f"thread(s), torch {torch.__version__}. {args.params}: {t.steps} steps, batch {t.batch_size}, lr {t.lr}, "
        f"{t.n_images} images of {t.size} px; {len(prompts)} samples ({params.prompts.eval} x {s.per_prompt}), "
        f"{s.teacher_steps} solver steps, CFG {s.teacher_guidance}, read by a toy_alignment classifier (held-out "
        f"shape accuracy on clean renders {scorer_metrics['accuracy_clean_shape']:.3f}).",
        "",
        "| training seed | " + " | ".join(ATTRIBUTES) + " | shape confusion (rows true, columns read: "
        + ", ".join(VOCAB["shape"]) + ") | training s |",
        "|---|" + "---|" * (len(ATTRIBUTES) + 2),
    ]  # fmt: skip
    for r in results:
        cells = " | ".join(f"{r['accuracy'][a]:.1%}" for a in ATTRIBUTES)
        lines.append(f"| {r['seed']} | {cells} | {r['confusion']} | {r['seconds']:.0f} |")
    means = " | ".join(f"{statistics.mean(r['accuracy'][a] for r in results):.1%}" for a in ATTRIBUTES)
    lines.append(f"| mean | {means} | | |")
    append_section(lines)


if __name__ == "__main__":
    main()
