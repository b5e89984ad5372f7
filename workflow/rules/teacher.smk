rule teacher:
    """Teacher caching: the toy world's teacher and rewards trained from scratch, prompt embeddings cached."""
    input:
        train=P.prompts.train,
        eval=P.prompts.eval,
    output:
        directory(TEACHER),
    params:
        file=PARAMS_FILE,
        settings=settings("teacher"),
    conda:
        "../envs/didr.yaml"
    log:
        str(layout.log_file(EXP, "teacher")),
    benchmark:
        str(layout.benchmark_file(EXP, "teacher"))
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    shell:
        "didr teacher --params {params.file} --out {output} > {log} 2>&1"
