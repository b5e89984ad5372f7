rule sample:
    """Evaluation images of one set: the teacher reference, the warm start, or one aligned generator."""
    input:
        teacher=TEACHER,
        generator=generator_of,
    output:
        directory(str(layout.samples_dir(EXP, "{set}"))),
    params:
        file=PARAMS_FILE,
        generator=lambda wildcards, input: f"--generator {input.generator}" if input.generator else "",
        settings=settings("sample"),
    conda:
        "../envs/didr.yaml"
    log:
        str(layout.log_file(EXP, "sample", "{set}")),
    benchmark:
        str(layout.benchmark_file(EXP, "sample", "{set}"))
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=30,
    shell:
        "didr sample --params {params.file} --teacher {input.teacher} {params.generator} --out {output} > {log} 2>&1"
