rule score:
    """Per-image rewards (training and held-out) and per-set fidelity against real and teacher images."""
    input:
        teacher=TEACHER,
        samples=str(layout.samples_dir(EXP, "{set}")),
        reference=str(layout.samples_dir(EXP, "teacher")),
    output:
        directory(str(layout.scores_dir(EXP, "{set}"))),
    params:
        file=PARAMS_FILE,
        settings=settings("score"),
    conda:
        "../envs/didr.yaml"
    log:
        str(layout.log_file(EXP, "score", "{set}")),
    benchmark:
        str(layout.benchmark_file(EXP, "score", "{set}"))
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=30,
    shell:
        "didr score --params {params.file} --teacher {input.teacher} --samples {input.samples}"
        " --reference {input.reference} --out {output} > {log} 2>&1"
