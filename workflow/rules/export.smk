rule export:
    """One align run as a diffusers pipeline folder with a model card (didr/export.py, docs/export.md): the teacher's
    pipeline with the run's network and a one-step scheduler. Inputs (teacher, run, the run's scores), output,
    command and resources: didr/jobs.py's table. Part of `all`, as `dvc repro` builds every DVC stage."""
    input:
        unpack(job_input("export")),
    output:
        directory(job_path("export")),
    params:
        file=PARAMS_FILE,
        settings=jobs.settings(P, "export"),
    conda:
        "../envs/didr.yaml"
    log:
        job_path("export", "log"),
    benchmark:
        job_path("export", "benchmark")
    threads: jobs.STAGES["export"].resources.threads
    resources:
        **jobs.rule_resources("export"),
    shell:
        jobs.shell("export")
