"""The pipeline's jobs, written once: for each stage the `didr` command, its named inputs and its output (paths from
didr/layout.py, functions of the experiment and the job's run id or sample set), the params keys it reads and its
default resources. The Snakemake rules (workflow/rules/*.smk), the DVC stages (didr/dvc_pipeline.py) and the
launcher (didr/launch.py) are all built from this table, so the three run the same jobs.

    stage    one job per            command (T teacher, W warm start, S samples, C scores: each stage's output)
    teacher  -                      didr teacher --params P --out T
    warmup   -                      didr warmup --params P --teacher T --out W
    align    run of the grid        didr align --params P --teacher T --warmup W <run options> --checkpoints K --out A
    sample   sample set             didr sample --params P --teacher T [--generator W or A] --out S
    score    sample set             didr score --params P --teacher T --samples S --reference S_teacher --out C
    report   -                      didr report --params P --scores C... --samples S... --runs A... --out R
    export   run of the grid        didr export --params P --teacher T --run A --scores C --out E

Every command also gets --threads (the job's); warmup and align get --processes, --accumulation and --strategy (the
job's `processes`, `accumulation` and `strategy` resources: how many processes share one run, micro-batches per
process, and ddp or fsdp: whether each process holds the networks or a shard of them).

A sample set is a reference (layout.REFERENCES: the teacher with N steps and CFG, the warm start), a run of the grid,
or a run's EMA generator at a step of align.evaluate_at (step=<N>/<run id>, sampled from the run's align output).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from didr import layout
from didr.grid import expand_grid, parse_run_id

Value = str | list[str]  # a path, or words (a list of paths, command options; empty for none)


@dataclass(frozen=True)
class Resources:
    """What one job of a stage asks for by default (a profile's set-resources, or launcher options, override it)."""

    gpus: int
    mem_mb: int
    runtime: int  # minutes
    threads: int
    processes: int = 1  # training processes of one job, one per GPU (torchrun; warmup and align only)
    accumulation: int = 1  # micro-batches per process and step (the batch stays params.yaml's)
    strategy: str = "ddp"  # ddp or fsdp: the trained networks replicated or sharded over the processes


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    `command` is in Snakemake's shell syntax, one word a placeholder at most: {input.<name>} and {params.<name>} are
    the job's values (a list fills several words, an empty one none), {params.file} the params file and {output} the
    output. `values(params, name)` gives a job's named inputs ("input.<name>") and other command values
    ("params.<name>"); a value that depends on what the name is (a run's options, a set's generator) is a function,
    called only when the job is a real one, not a pattern whose name is a placeholder such as {run} or ${key}."""

    name: str
    each: str  # one job per: "" the stage once, "run" run of the grid, "set" sample set
    command: str
    output: Callable[[str, str], Any]  # (experiment, name) -> path
    values: Callable[[Any, str], dict[str, Value | Callable[[], Value]]]  # (params, name) -> slot -> value
    reads: tuple[str, ...]  # params sections or section.key: a job reruns when one changes
    resources: Resources
    local: bool = False  # runs on Snakemake's host (localrule); its resources are the launcher's only
    done: str = ""  # the file of the output whose presence means the job is done ("" for the output itself)


def _teacher(p: Any, name: str) -> dict:
    return {"input.train": p.prompts.train, "input.eval": p.prompts.eval}


def _warmup(p: Any, name: str) -> dict:
    return {"input.teacher": str(layout.teacher_dir(p.experiment))}


def _align(p: Any, run: str) -> dict:
    exp = p.experiment
    return {
        "input.teacher": str(layout.teacher_dir(exp)),
        "input.warmup": str(layout.warmup_dir(exp)),
        "params.options": lambda: parse_run_id(run).align_options(),  # --method M --strength S --seed N [--set k=v]
        "params.checkpoints": str(layout.checkpoints_dir(exp, run)),  # outside the output: a retried job resumes
    }


def _sample(p: Any, sample_set: str) -> dict:
    def generator() -> Value:  # the one-step generator of the set: none for the teacher reference
        folder = layout.generator_dir(p.experiment, sample_set)
        return [] if folder is None else str(folder)

    def made_by() -> Value:  # the stage output holding it: a snapshot's is its run's align output
        snapshot = layout.parse_snapshot_set(sample_set)
        return generator() if snapshot is None else str(layout.align_dir(p.experiment, snapshot[0]))

    return {
        "input.teacher": str(layout.teacher_dir(p.experiment)),
        "input.generator": made_by,
        "params.generator": lambda: ["--generator", generator()] if generator() else [],
    }


def _score(p: Any, sample_set: str) -> dict:
    exp = p.experiment
    return {
        "input.teacher": str(layout.teacher_dir(exp)),
        "input.samples": str(layout.samples_dir(exp, sample_set)),
        "input.reference": str(layout.samples_dir(exp, "teacher")),
    }


def _report(p: Any, name: str) -> dict:
    exp, sets = p.experiment, sample_sets(p)
    return {
        "input.scores": [str(layout.scores_dir(exp, s)) for s in sets],
        "input.samples": [str(layout.samples_dir(exp, s)) for s in sets],
        "input.runs": [str(layout.align_dir(exp, run)) for run in runs(p)],  # their metrics.parquet: the curves
        "params.out": str(layout.report_dir(exp)),  # one folder, which `didr report` replaces as a whole
    }


def _export(p: Any, run: str) -> dict:
    exp = p.experiment
    return {
        "input.teacher": str(layout.teacher_dir(exp)),
        "input.run": str(layout.align_dir(exp, run)),
        "input.scores": str(layout.scores_dir(exp, run)),  # the run's row of the report's table
    }


DISTRIBUTED = (  # warmup, align
    "--processes {resources.processes} --accumulation {resources.accumulation} --strategy {resources.strategy}"
)

# The stages with one job per run or sample set take one thread, so that a CPU machine runs their many jobs side by
# side (two 1-thread align jobs on 2 cores: 1.42x the throughput of one 2-thread job after another, measured on the
# embedded world); teacher and warmup run alone and take 2. A profile's set-threads overrides these.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in [
        Stage(
            "teacher",
            each="",
            command="didr teacher --params {params.file} --threads {threads} --out {output}",
            output=lambda exp, name: layout.teacher_dir(exp),
            values=_teacher,
            reads=("seed", "teacher", "prompts"),
            resources=Resources(gpus=1, mem_mb=8000, runtime=60, threads=2),
        ),
        Stage(
            "warmup",
            each="",
            command="didr warmup --params {params.file} --threads {threads} --teacher {input.teacher}"
            f" {DISTRIBUTED} --out {{output}}",
            output=lambda exp, name: layout.warmup_dir(exp),
            values=_warmup,
            reads=("seed", "warmup", "finetune", "align.t_min", "align.t_max_sampling"),
            resources=Resources(gpus=1, mem_mb=8000, runtime=60, threads=2),
        ),
        Stage(
            "align",
            each="run",
            command="didr align --params {params.file} --threads {threads} --teacher {input.teacher}"
            " --warmup {input.warmup} {params.options} --checkpoints {params.checkpoints}"
            f" {DISTRIBUTED} --out {{output}}",
            output=layout.align_dir,
            values=_align,
            reads=("align", "finetune", "rewards.train", "rewards.models"),
            resources=Resources(gpus=1, mem_mb=8000, runtime=120, threads=1),
        ),
        Stage(
            "sample",
            each="set",
            command="didr sample --params {params.file} --threads {threads} --teacher {input.teacher}"
            " {params.generator} --out {output}",
            output=layout.samples_dir,
            values=_sample,
            reads=("sample",),
            resources=Resources(gpus=1, mem_mb=8000, runtime=30, threads=1),
        ),
        Stage(
            "score",
            each="set",
            command="didr score --params {params.file} --threads {threads} --teacher {input.teacher}"
            " --samples {input.samples} --reference {input.reference} --out {output}",
            output=layout.scores_dir,
            values=_score,
            reads=("seed", "rewards.eval", "rewards.models", "score"),
            resources=Resources(gpus=1, mem_mb=8000, runtime=30, threads=1),
        ),
        Stage(
            "report",
            each="",
            command="didr report --params {params.file} --threads {threads} --scores {input.scores}"
            " --samples {input.samples} --runs {input.runs} --out {params.out}",
            output=lambda exp, name: layout.report_dir(exp),
            values=_report,
            reads=("rewards.eval",),
            resources=Resources(gpus=0, mem_mb=8000, runtime=30, threads=1),  # Snakemake's local jobs get 1 thread
            local=True,
            done="metrics.parquet",
        ),
        Stage(
            "export",
            each="run",
            command="didr export --params {params.file} --threads {threads} --teacher {input.teacher}"
            " --run {input.run} --scores {input.scores} --out {output}",
            output=layout.export_dir,
            values=_export,
            reads=("export",),
            resources=Resources(gpus=0, mem_mb=16000, runtime=30, threads=1),
        ),
    ]
}
REPORT_TABLES = ("metrics.parquet", "metrics.csv", "metrics.json", "fronts.csv", "grid.png")  # and pareto_<reward>.png


@dataclass(frozen=True)
class Job:
    """One job: its stage, its name (the stage's, a run id or a sample set), named inputs, output and the other
    values of its command; a pattern job's name is a placeholder, and its values hold placeholders too."""

    stage: Stage
    name: str
    input: dict[str, Value]
    params: dict[str, Value]
    output: str
    log: str
    benchmark: str
    slots: dict[str, Value] = field(repr=False)

    @property
    def done(self) -> str:
        return f"{self.output}/{self.stage.done}" if self.stage.done else self.output

    def command(
        self,
        params_file: str,
        processes: int | None = None,
        accumulation: int | None = None,
        threads: int | None = None,
        strategy: str | None = None,
    ) -> list[str]:
        """The job's `didr` command, word by word (with the stage's resources unless given)."""
        r = self.stage.resources
        numbers = {
            "threads": threads or r.threads,
            "resources.processes": processes or r.processes,
            "resources.accumulation": accumulation or r.accumulation,
            "resources.strategy": strategy or r.strategy,
        }
        slots = {**self.slots, "params.file": str(params_file)} | {k: str(v) for k, v in numbers.items()}
        return fill(self.stage.command, slots)


def fill(template: str, slots: dict[str, Value]) -> list[str]:
    """The words of a command template with each {slot} word replaced by its value (a list: its words)."""
    words = []
    for word in template.split():
        if not (word.startswith("{") and word.endswith("}")):
            words.append(word)
            continue
        value = slots[word[1:-1]]
        words.extend(value if isinstance(value, list) else [value] if value else [])
    return words


def runs(p: Any) -> list[str]:
    """The run ids of the grid, in grid order."""
    return [run.id for run in expand_grid(p.grid)]


def sample_sets(p: Any) -> list[str]:
    """The sample sets: the references, the runs of the grid, then each run's snapshot at each step of
    align.evaluate_at (step=<N>/<run id>)."""
    snapshots = [layout.snapshot_set(run, step) for step in p.align.evaluate_at for run in runs(p)]
    return [*layout.REFERENCES, *runs(p), *snapshots]


def names(p: Any, stage: str) -> list[str]:
    """The names of a stage's jobs: the stage's own, the run ids, or the sample sets."""
    each = STAGES[stage].each
    return runs(p) if each == "run" else sample_sets(p) if each == "set" else [stage]


def job(p: Any, stage: str, name: str | None = None, given: Mapping[str, Value] | None = None) -> Job:
    """The job `name` of `stage` (a stage run once needs no name). With `given` values for the slots that depend on
    what the name is, `name` may be a placeholder ({run}, ${key}) and the job a pattern of the stage's jobs."""
    spec = STAGES[stage]
    name = name or stage
    given = given or {}
    slots = {slot: given[slot] if slot in given else value() if callable(value) else value
             for slot, value in spec.values(p, name).items()}  # fmt: skip
    output = slots["output"] = str(spec.output(p.experiment, name))
    one = name if spec.each else None
    return Job(
        stage=spec,
        name=name,
        input={slot[6:]: value for slot, value in slots.items() if slot.startswith("input.")},
        params={slot[7:]: value for slot, value in slots.items() if slot.startswith("params.")},
        output=output,
        log=str(layout.log_file(p.experiment, stage, one)),
        benchmark=str(layout.benchmark_file(p.experiment, stage, one)),
        slots=slots,
    )


def jobs(p: Any, stage: str) -> list[Job]:
    """Every job of a stage."""
    return [job(p, stage, name) for name in names(p, stage)]


def settings(p: Any, stage: str) -> str:
    """The params a stage reads, as one JSON string (a Snakemake param: a job reruns when it changes)."""
    values = asdict(p)
    picked = {}
    for key in STAGES[stage].reads:
        section, _, name = key.partition(".")
        picked[key] = values[section][name] if name else values[section]
    return json.dumps(picked, sort_keys=True)


PRE_QUOTED = "params."  # a rule's params.<name> (but params.file) are shell words already (shell_words)


def shell(stage: str) -> str:
    """A rule's shell command: the stage's `didr` command, its output and errors in the job's log. Every value is one
    shell-quoted word (Snakemake's {slot:q}; a list, each of its items), so a path with a space or `$(...)` is inert:
    the params the rules compute (PRE_QUOTED) are quoted when computed (shell_words), the rule's threads are a number.
    `exec`: bash becomes `didr`, so a stop signal sent to the whole job step (SLURM's early signal, a preemption) is
    not the death of the shell, which would end the job while `didr` writes its checkpoint (docs/reliability.md)."""
    words = [
        word if not (word.startswith("{") and word.endswith("}")) or word == "{threads}"
        else word if word.startswith("{" + PRE_QUOTED) and word != "{params.file}"
        else word[:-1] + ":q}"
        for word in STAGES[stage].command.split()
    ]  # fmt: skip
    return "exec " + " ".join(words) + " > {log:q} 2>&1"


def shell_words(value: Value) -> str:
    """A command value as shell text: each word quoted (shlex: a safe word stays as it is), joined by spaces."""
    return shlex.join(value) if isinstance(value, list) else shlex.quote(value) if value else ""


def rule_resources(stage: str) -> dict[str, int | str]:
    """A rule's resources (gpu=1 -> sbatch --gpus=1, mem_mb -> --mem, runtime in minutes -> --time); warmup and align
    also have `processes`, `accumulation` and `strategy`, which a (workflow) profile's set-resources may change."""
    r = STAGES[stage].resources
    trains = DISTRIBUTED in STAGES[stage].command
    distributed: dict[str, int | str] = (
        {"processes": r.processes, "accumulation": r.accumulation, "strategy": r.strategy} if trains else {}
    )
    return {"gpu": r.gpus, "mem_mb": r.mem_mb, "runtime": r.runtime} | distributed
