rule teacher:
    """Teacher caching: the toy world's teacher and rewards trained from scratch, prompt embeddings cached.
    Inputs (train, eval: the prompt files), output, command and resources: didr/jobs.py's table."""
    input:
        unpack(job_input("teacher")),
    output:
        directory(job_path("teacher")),
    params:
        file=PARAMS_FILE,
        settings=jobs.settings(P, "teacher"),
    conda:
        "../envs/didr.yaml"
    log:
        job_path("teacher", "log"),
    benchmark:
        job_path("teacher", "benchmark")
    threads: jobs.STAGES["teacher"].resources.threads
    resources:
        **jobs.rule_resources("teacher"),
    shell:
        jobs.shell("teacher")
