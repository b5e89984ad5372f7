# The params file, the grid and the jobs every rule shares. The params file is read once, here, by the same code and
# schema as the `didr` command, so a bad value stops the workflow before any job is submitted. Each rule is a stage of
# didr/jobs.py's table: its command, inputs, output, the params it reads and its resources are written there once,
# for the rules, the DVC stages and `didr launch` alike.
import os
from dataclasses import asdict
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from didr import jobs, layout
from didr.config import ConfigError, load_params

# The params file is the last --configfile (a preset), else params.yaml. Snakemake's `config` would be params.yaml
# deep-merged with the preset (a preset's grid.methods added to params.yaml's): it is replaced by the one file the
# `didr` commands read, so the captions of the report (workflow/report/*.rst) show the params the jobs ran with.
PARAMS_FILE = workflow.overwrite_configfiles[-1] if workflow.overwrite_configfiles else "params.yaml"
if workflow.config_settings.config:
    raise WorkflowError(
        "--config: the didr commands read the params file only; write the values in a copy of it and pass that"
        " with --configfile"
    )
try:
    P = load_params(PARAMS_FILE)
except ConfigError as error:
    raise WorkflowError(str(error)) from None
config.clear()
config.update(yaml.safe_load(Path(PARAMS_FILE).read_text(encoding="utf-8")))
validate(config, "../schemas/params.schema.yaml")
config.update(asdict(P))  # and the defaults the didr commands take for the keys the file leaves out
for key, prompt_file in [("prompts.train", P.prompts.train), ("prompts.eval", P.prompts.eval)]:
    if not os.path.isfile(prompt_file):
        raise WorkflowError(f"{PARAMS_FILE}: {key}: prompt file {prompt_file} not found")

EXP = P.experiment
REPORTS = jobs.STAGES["report"].output(EXP, "report")
REPORT_FILES = [f"{REPORTS}/{name}" for name in jobs.REPORT_TABLES] + [
    f"{REPORTS}/pareto_{reward}.png" for reward in P.rewards.eval
]


wildcard_constraints:
    run=r"method=[^/]+(/[^/=]+=[^/]+)*/seed=\d+",
    set=r"teacher|warm-start|(step=\d+/)?method=[^/]+(/[^/=]+=[^/]+)*/seed=\d+",  # step=N/<run id>: a snapshot


def job(stage, wildcards):
    """The jobs.Job of a rule's job: its name is the run or set wildcard, or the stage's for a stage run once."""
    return jobs.job(P, stage, wildcards.get("run") or wildcards.get("set"))


def job_input(stage):
    """A rule's named inputs (jobs.Job.input), as an input function for unpack()."""
    return lambda wildcards: job(stage, wildcards).input


def job_param(stage, name):
    """A value of a rule's command (jobs.Job.params) as a param: its command words, each shell-quoted (jobs.shell)."""

    def param(wildcards):
        return jobs.shell_words(job(stage, wildcards).params[name])

    return param


def job_path(stage, kind="output"):
    """The output, log or benchmark path of a rule's jobs, with {run} or {set} for the job's name."""
    spec = jobs.STAGES[stage]
    name = {"run": "{run}", "set": "{set}"}.get(spec.each)
    if kind == "output":
        return str(spec.output(EXP, name))
    return str({"log": layout.log_file, "benchmark": layout.benchmark_file}[kind](EXP, stage, name))
