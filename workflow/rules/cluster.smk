# Cluster facts come from the profile (slurm/config.yaml), never from params.yaml. Under the slurm executor, a job
# without a partition stops the workflow before anything is submitted; dry runs (-n) and local runs are unaffected.
# This file owns the workflow's onstart hook (Snakemake keeps only the last one registered).


def check_slurm_partition():
    """One-line WorkflowError when a job to submit has no slurm_partition or an unexpanded $VARIABLE as one."""
    if workflow.executor_plugin.name != "slurm":
        return
    for job in workflow.dag.needrun_jobs():
        partition = str(job.resources.get("slurm_partition", ""))
        if not job.is_local and (not partition or "$" in partition):
            raise WorkflowError(
                f"slurm_partition of rule {job.rule.name} is {partition or 'unset'!r}: export"
                " DIDR_SLURM_PARTITION=<partition> or set slurm_partition under default-resources in slurm/config.yaml"
            )


onstart:
    check_slurm_partition()
