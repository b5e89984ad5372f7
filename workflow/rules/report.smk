rule report:
    """Across the grid and the references: the metrics table, Pareto plots per reward, the image grid."""
    input:
        scores=expand(str(layout.scores_dir(EXP, "{set}")), set=SAMPLE_SETS),
        samples=expand(str(layout.samples_dir(EXP, "{set}")), set=SAMPLE_SETS),
    output:
        table=f"{REPORTS}/metrics.parquet",
        csv=report(f"{REPORTS}/metrics.csv", caption="../report/metrics.rst", category="Metrics"),
        json=f"{REPORTS}/metrics.json",
        fronts=report(f"{REPORTS}/fronts.csv", caption="../report/fronts.rst", category="Pareto fronts"),
        grid=report(f"{REPORTS}/grid.png", caption="../report/grid.rst", category="Image grid"),
        pareto=report(
            expand(f"{REPORTS}/pareto_{{reward}}.png", reward=P.rewards.eval),
            caption="../report/pareto.rst",
            category="Pareto fronts",
        ),
    params:
        file=PARAMS_FILE,
        out=lambda wildcards, output: os.path.dirname(output.table),
        settings=settings("report"),
    conda:
        "../envs/didr.yaml"
    log:
        str(layout.log_file(EXP, "report")),
    benchmark:
        str(layout.benchmark_file(EXP, "report"))
    localrule: True
    shell:
        "didr report --params {params.file} --scores {input.scores} --samples {input.samples} --out {params.out}"
        " > {log} 2>&1"
