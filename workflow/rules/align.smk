rule align:
    """One run of the grid from the warm start. Checkpoints live outside the output, so a preempted job (exit 75)
    that is retried resumes from its latest checkpoint. Inputs (teacher, warmup), output, command and resources:
    didr/jobs.py's table."""
    input:
        unpack(job_input("align")),
    output:
        directory(job_path("align")),
    params:
        file=PARAMS_FILE,
        options=job_param("align", "options"),
        checkpoints=job_param("align", "checkpoints"),
        settings=jobs.settings(P, "align"),
    conda:
        "../envs/didr.yaml"
    log:
        job_path("align", "log"),
    benchmark:
        job_path("align", "benchmark")
    threads: jobs.STAGES["align"].resources.threads
    resources:
        **jobs.rule_resources("align"),
    shell:
        jobs.shell("align")
