"""dvc.yaml from a params file: the Snakemake rules as DVC stages, one stage per job, with the same names, commands,
params sections, dependencies and outputs, built from didr.grid and didr.layout like the rules themselves.

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

from didr import layout
from didr.config import STAGE_PARAMS, load_params
from didr.grid import expand_grid

HEADER = """\
# Generated from {params} by `python -m didr.dvc_pipeline --params {params} --out dvc.yaml`; do not edit.
# The Snakemake rules as DVC stages, one per job, with the same commands (logs aside): `dvc repro` runs the DAG,
# `dvc status` names the stale jobs, `dvc metrics show` / `dvc plots show` read the report.
"""


def _holds(data: dict, key: str) -> bool:
    """Whether the params mapping writes out `key` (section or section.name)."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def pipeline(params_file: str) -> dict:
    """The dvc.yaml mapping of the experiment in `params_file` (a path relative to the repository root)."""
    params = load_params(params_file)
    exp = params.experiment
    teacher, warmup = str(layout.teacher_dir(exp)), str(layout.warmup_dir(exp))
    runs = {run.id: " ".join(run.align_options()) for run in expand_grid(params.grid)}
    sets = [*layout.REFERENCES, *runs]
    generators = {name: layout.generator_dir(exp, name) for name in sets}  # none for the teacher set
    scores = [str(layout.scores_dir(exp, name)) for name in sets]
    samples = [str(layout.samples_dir(exp, name)) for name in sets]
    reports = str(layout.report_dir(exp))

    written = yaml.safe_load(Path(params_file).read_text(encoding="utf-8"))

    def reads(stage: str) -> list:
        """The stage's params that the file writes out (DVC tracks only keys a params file holds; an absent one
        takes its default)."""
        keys = [key for key in STAGE_PARAMS[stage] if _holds(written, key)]
        return keys if params_file == "params.yaml" else [{params_file: keys}]

    def cmd(stage: str, *options: str) -> str:
        return " ".join([f"didr {stage} --params {params_file}", *options])

    stages = {
        "teacher": {
            "cmd": cmd("teacher", f"--out {teacher}"),
            "deps": [params.prompts.train, params.prompts.eval],
            "params": reads("teacher"),
            "outs": [teacher],
        },
        "warmup": {
            "cmd": cmd("warmup", f"--teacher {teacher} --out {warmup}"),
            "deps": [teacher],
            "params": reads("warmup"),
            "outs": [warmup],
        },
        "align": {
            "foreach": runs,  # run id: its `didr align` options
            "do": {
                "cmd": cmd(
                    "align",
                    f"--teacher {teacher} --warmup {warmup} ${{item}}",
                    f"--checkpoints {layout.checkpoints_dir(exp, '${key}')} --out {layout.align_dir(exp, '${key}')}",
                ),
                "deps": [teacher, warmup],
                "params": reads("align"),
                "outs": [str(layout.align_dir(exp, "${key}"))],
            },
        },
        "sample": {
            # the teacher set samples the teacher itself: its second dependency repeats the first
            "foreach": {
                name: {"model": str(generator or teacher), "option": f"--generator {generator}" if generator else ""}
                for name, generator in generators.items()
            },
            "do": {
                "cmd": cmd("sample", f"--teacher {teacher} ${{item.option}} --out {layout.samples_dir(exp, '${key}')}"),
                "deps": [teacher, "${item.model}"],
                "params": reads("sample"),
                "outs": [str(layout.samples_dir(exp, "${key}"))],
            },
        },
        "score": {
            "foreach": sets,
            "do": {
                "cmd": cmd(
                    "score",
                    f"--teacher {teacher} --samples {layout.samples_dir(exp, '${item}')}",
                    f"--reference {layout.samples_dir(exp, 'teacher')} --out {layout.scores_dir(exp, '${item}')}",
                ),
                "deps": [teacher, str(layout.samples_dir(exp, "${item}")), str(layout.samples_dir(exp, "teacher"))],
                "params": reads("score"),
                "outs": [str(layout.scores_dir(exp, "${item}"))],
            },
        },
        "report": {
            "cmd": cmd("report", "--scores", *scores, "--samples", *samples, f"--out {reports}"),
            "deps": [*scores, *samples],
            "params": reads("report"),
            "outs": [reports],  # one folder: `didr report` replaces it as a whole
        },
    }
    table = f"{reports}/metrics.csv"
    return {
        "stages": stages,
        "metrics": [f"{reports}/metrics.json"],
        "plots": [  # the Pareto data: fidelity against each held-out reward, one point per sample set
            {f"pareto_{reward}": {"template": "scatter", "x": "fid_real", "y": {table: f"{reward}_mean"}}}
            for reward in params.rewards.eval
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
