# Validation, the grid and the paths every rule shares. The params file is read once, here, by the same code and
# schema as the `didr` command, so a bad value stops the workflow before any job is submitted.
import json
import os
from dataclasses import asdict

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from didr import layout
from didr.config import STAGE_PARAMS, ConfigError, load_params
from didr.grid import expand_grid, parse_run_id

PARAMS_FILE = workflow.overwrite_configfiles[-1] if workflow.overwrite_configfiles else "params.yaml"
try:
    P = load_params(PARAMS_FILE)
except ConfigError as error:
    raise WorkflowError(str(error)) from None
validate(config, "../schemas/params.schema.yaml")
for key, prompt_file in [("prompts.train", P.prompts.train), ("prompts.eval", P.prompts.eval)]:
    if not os.path.isfile(prompt_file):
        raise WorkflowError(f"{PARAMS_FILE}: {key}: prompt file {prompt_file} not found")

EXP = P.experiment
TEACHER = str(layout.teacher_dir(EXP))
WARMUP = str(layout.warmup_dir(EXP))
REPORTS = str(layout.report_dir(EXP))
GRID = [run.id for run in expand_grid(P.grid)]
SAMPLE_SETS = [*layout.REFERENCES, *GRID]  # the teacher with N steps and CFG, the warm start, the grid
REPORT_FILES = [
    f"{REPORTS}/{name}"
    for name in ["metrics.parquet", "metrics.csv", "metrics.json", "fronts.csv", "grid.png"]
    + [f"pareto_{reward}.png" for reward in P.rewards.eval]
]


wildcard_constraints:
    run=r"method=[^/]+(/[^/=]+=[^/]+)*/seed=\d+",
    set=r"teacher|warm-start|method=[^/]+(/[^/=]+=[^/]+)*/seed=\d+",


def settings(stage):
    """The params a stage reads (didr.config.STAGE_PARAMS), as one string: Snakemake reruns a job when it changes."""
    values = asdict(P)
    picked = {}
    for key in STAGE_PARAMS[stage]:
        section, _, name = key.partition(".")
        picked[key] = values[section][name] if name else values[section]
    return json.dumps(picked, sort_keys=True)


def align_options(wildcards):
    """The `didr align` options of a run id (method, strength, seed, overridden align settings)."""
    return " ".join(parse_run_id(wildcards.run).align_options())


def generator_of(wildcards):
    """The one-step generator a sample set comes from (none for the teacher reference)."""
    folder = layout.generator_dir(EXP, wildcards.set)
    return [] if folder is None else str(folder)
