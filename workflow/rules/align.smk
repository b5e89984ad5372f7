rule align:
    """One run of the grid from the warm start. Checkpoints live outside the output, so a preempted job (exit 75)
    that is retried resumes from its latest checkpoint."""
    input:
        teacher=TEACHER,
        warmup=WARMUP,
    output:
        directory(str(layout.align_dir(EXP, "{run}"))),
    params:
        file=PARAMS_FILE,
        options=align_options,
        checkpoints=lambda wildcards: layout.checkpoints_dir(EXP, wildcards.run),
        settings=settings("align"),
    conda:
        "../envs/didr.yaml"
    log:
        str(layout.log_file(EXP, "align", "{run}")),
    benchmark:
        str(layout.benchmark_file(EXP, "align", "{run}"))
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    shell:
        "didr align --params {params.file} --teacher {input.teacher} --warmup {input.warmup} {params.options}"
        " --checkpoints {params.checkpoints} --out {output} > {log} 2>&1"
