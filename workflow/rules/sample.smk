rule sample:
    """Evaluation images of one set: the teacher reference, the warm start, or one aligned generator. Inputs
    (teacher, generator: none for the teacher set), output, command and resources: didr/jobs.py's table."""
    input:
        unpack(job_input("sample")),
    output:
        directory(job_path("sample")),
    params:
        file=PARAMS_FILE,
        generator=job_param("sample", "generator"),
        settings=jobs.settings(P, "sample"),
    conda:
        "../envs/didr.yaml"
    log:
        job_path("sample", "log"),
    benchmark:
        job_path("sample", "benchmark")
    threads: jobs.STAGES["sample"].resources.threads
    resources:
        **jobs.rule_resources("sample"),
    shell:
        jobs.shell("sample")
