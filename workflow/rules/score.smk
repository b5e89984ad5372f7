rule score:
    """Per-image rewards (training and held-out) and per-set fidelity against real and teacher images. Inputs
    (teacher, samples, reference: the teacher's samples), output, command and resources: didr/jobs.py's table."""
    input:
        unpack(job_input("score")),
    output:
        directory(job_path("score")),
    params:
        file=PARAMS_FILE,
        settings=jobs.settings(P, "score"),
    conda:
        "../envs/didr.yaml"
    log:
        job_path("score", "log"),
    benchmark:
        job_path("score", "benchmark")
    threads: jobs.STAGES["score"].resources.threads
    resources:
        **jobs.rule_resources("score"),
    shell:
        jobs.shell("score")
