"""dvc.yaml from a params file: the Snakemake rules as DVC stages, one stage per job, with the same names, commands,
params sections, dependencies and outputs, built from didr/jobs.py's table like the rules themselves.

    python -m didr.dvc_pipeline --params params.yaml --out dvc.yaml

A stage per job: `teacher`, `warmup`, `align@<run id>`, `sample@<set>`, `score@<set>`, `report`. DVC names the stages
of a `foreach` `<stage>@<key>`, and a run id such as method=didr/beta=0.5/seed=0 is a valid key (a stage name written
out may hold no punctuation but - and _). The grid differs per method (beta, alpha, weight and override axes), which
DVC's foreach and matrix cannot expand from params.yaml themselves: the generator expands it and writes each
`foreach` as the run ids or sample sets it iterates over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from didr import jobs
from didr.config import load_params
from didr.evaluation import curves

HEADER = """\
# Generated from {params} by `python -m didr.dvc_pipeline --params {params} --out dvc.yaml`; do not edit.
# The Snakemake rules as DVC stages, one per job, with the same commands (logs aside): `dvc repro` runs the DAG,
# `dvc status` names the stale jobs, `dvc metrics show` / `dvc plots show` read the report.
"""
# How DVC iterates over a stage's jobs: its `foreach` items (one per run id or sample set, from each job) and the
# slots of the stage's command that take an item's value instead of a value built from the job's name (${key}).
FOREACH = {
    "align": (lambda job: " ".join(job.params["options"]), {"params.options": "${item}"}),  # the run's options
    "sample": (  # the teacher set samples the teacher itself: its second dependency repeats the first
        lambda job: {
            "model": job.input["generator"] or job.input["teacher"],
            "option": " ".join(job.params["generator"]),
        },
        {"input.generator": "${item.model}", "params.generator": "${item.option}"},
    ),
    "score": (None, {}),  # a list of sample sets: ${item} is the set
    "export": (None, {}),  # a list of run ids: ${item} is the run
}


def _holds(data: dict, key: str) -> bool:
    """Whether the params mapping writes out `key` (section or section.name)."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _paths(value: jobs.Value) -> list[str]:
    return value if isinstance(value, list) else [value] if value else []


def pipeline(params_file: str) -> dict:
    """The dvc.yaml mapping of the experiment in `params_file` (a path relative to the repository root)."""
    params = load_params(params_file)
    written = yaml.safe_load(Path(params_file).read_text(encoding="utf-8"))

    def reads(stage: str) -> list:
        """The stage's params that the file writes out (DVC tracks only keys a params file holds; an absent one
        takes its default)."""
        keys = [key for key in jobs.STAGES[stage].reads if _holds(written, key)]
        return keys if params_file == "params.yaml" else [{params_file: keys}]

    def stage(job: jobs.Job) -> dict:
        deps = [path for value in job.input.values() for path in _paths(value)]
        words = job.command(params_file)  # each word shell-quoted as the rules' {slot:q}; a ${...} is DVC's own
        cmd = " ".join(word if "${" in word else jobs.shell_words(word) for word in words)
        return {"cmd": cmd, "deps": deps, "params": reads(job.stage.name), "outs": [job.output]}

    stages = {}
    for name, spec in jobs.STAGES.items():
        if not spec.each:
            stages[name] = stage(jobs.job(params, name))
            continue
        item, given = FOREACH[name]
        key = "${key}" if item else "${item}"
        every = jobs.jobs(params, name)
        foreach = {job.name: item(job) for job in every} if item else [job.name for job in every]
        stages[name] = {"foreach": foreach, "do": stage(jobs.job(params, name, key, given))}
    reports = jobs.STAGES["report"].output(params.experiment, "report")
    table = f"{reports}/metrics.csv"
    return {
        "stages": stages,
        "metrics": [f"{reports}/metrics.json"],
        "plots": [  # the Pareto data: fidelity against each held-out reward, one point per sample set
            {f"pareto_{reward}": {"template": "scatter", "x": "fid_real", "y": {table: f"{reward}_mean"}}}
            for reward in params.rewards.eval
        ]
        + [  # the training curves: a metric against step, a line per align run (the report's curves_<metric>.csv)
            {
                f"curves_{metric}": {
                    "template": "linear",
                    "x": "step",
                    "y": {f"{reports}/{curves.table_name(metric)}": jobs.runs(params)},
                }
            }
            for metric in curves.TABLES
        ],
    }


def render(params_file: str) -> str:
    """The text of dvc.yaml for `params_file`."""
    body = yaml.safe_dump(pipeline(params_file), sort_keys=False, width=120)
    return HEADER.format(params=params_file) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m didr.dvc_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the params file, relative to the repository root")
    parser.add_argument("--out", type=Path, default=Path("dvc.yaml"))
    args = parser.parse_args(argv)
    args.out.write_text(render(args.params), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
