# The didr pipeline: teacher -> warmup -> align (the grid) -> sample -> score -> report.
# Laptop: `snakemake --cores 2 all`; cluster: `snakemake --profile slurm all`; a preset: add `--configfile FILE`
# after the target (`--configfile` takes several files: a target after it would be read as one).
# Every experiment fact comes from params.yaml (checked against workflow/schemas/params.schema.yaml before any job
# is submitted); cluster facts come from the profile.
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/warmup.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        REPORT_FILES,
        [job.output for job in jobs.jobs(P, "export")],
