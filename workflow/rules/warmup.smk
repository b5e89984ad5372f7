rule warmup:
    """The one-step generator initialised from the teacher at t*, and the fake score warmed up on its samples."""
    input:
        teacher=TEACHER,
    output:
        directory(WARMUP),
    params:
        file=PARAMS_FILE,
        settings=settings("warmup"),
    conda:
        "../envs/didr.yaml"
    log:
        str(layout.log_file(EXP, "warmup")),
    benchmark:
        str(layout.benchmark_file(EXP, "warmup"))
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    shell:
        "didr warmup --params {params.file} --teacher {input.teacher} --out {output} > {log} 2>&1"
