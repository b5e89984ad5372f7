from didr.evaluation import curves, over_training
from didr.grid import parse_run_id

# the methods of the grid's runs: one figure of training curves each (the grid has at least one run)
CURVE_METHODS = list(dict.fromkeys(parse_run_id(run).method for run in jobs.runs(P)))
# reward and fidelity against step, per held-out reward, when the runs write snapshots (align.evaluate_at)
OVER_TRAINING = (
    [f"{REPORTS}/{name(r)}" for r in P.rewards.eval for name in (over_training.table_name, over_training.figure_name)]
    + [f"{REPORTS}/over_training.md"]
    if P.align.evaluate_at
    else []
)


rule report:
    """Across the grid and the references: the metrics table, Pareto plots per reward, the image grid. Inputs
    (scores, samples: every sample set's) and command: didr/jobs.py's table; it runs on Snakemake's host."""
    input:
        unpack(job_input("report")),
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
        curves=report(
            [f"{REPORTS}/{curves.figure_name(method)}" for method in CURVE_METHODS],
            caption="../report/curves.rst",
            category="Training curves",
        ),
        curve_tables=[f"{REPORTS}/{curves.table_name(metric)}" for metric in curves.TABLES],
        curve_captions=f"{REPORTS}/curves.md",
        over_training=OVER_TRAINING,
    params:
        file=PARAMS_FILE,
        out=job_param("report", "out"),
        settings=jobs.settings(P, "report"),
    conda:
        "../envs/didr.yaml"
    log:
        job_path("report", "log"),
    benchmark:
        job_path("report", "benchmark")
    localrule: True
    shell:
        jobs.shell("report")
