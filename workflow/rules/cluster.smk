# Cluster facts come from the profile (slurm/config.yaml), never from params.yaml. Under the slurm executor, a job
# without a partition (none, or an unset variable left as `$DIDR_SLURM_PARTITION`) stops the workflow with one line
# before anything is submitted. Dry runs (-n) and local runs skip the hook; the executor is only known once the
# workflow starts, hence onstart (Snakemake keeps one onstart hook: this file owns it).
from snakemake.exceptions import WorkflowError


onstart:
    if workflow.executor_plugin.name == "slurm":
        for job in workflow.dag.needrun_jobs():
            partition = str(job.resources.get("slurm_partition", ""))
            if not job.is_local and (not partition or "$" in partition):
                raise WorkflowError(
                    f"slurm_partition of rule {job.rule.name} is {partition or 'unset'!r}: export"
                    " DIDR_SLURM_PARTITION=<partition> or set slurm_partition under default-resources in"
                    " slurm/config.yaml"
                )
