rule warmup:
    """The one-step generator initialised from the teacher at t*, and the fake score warmed up on its samples.
    Inputs (teacher), output, command and resources: didr/jobs.py's table."""
    input:
        unpack(job_input("warmup")),
    output:
        directory(job_path("warmup")),
    params:
        file=PARAMS_FILE,
        settings=jobs.settings(P, "warmup"),
    conda:
        "../envs/didr.yaml"
    log:
        job_path("warmup", "log"),
    benchmark:
        job_path("warmup", "benchmark")
    threads: jobs.STAGES["warmup"].resources.threads
    resources:
        **jobs.rule_resources("warmup"),
    shell:
        jobs.shell("warmup")
