"""Training curves (didr/evaluation/curves.py): the tables hold each run's metrics.parquet numbers, the figures are
PNGs of the size their panels give, and `dvc plots show` draws the tables from the generated dvc.yaml's plots."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from didr.dvc_pipeline import pipeline
from didr.evaluation.curves import (
    TABLES,
    RunCurves,
    curve_table,
    figure_size,
    panels,
    plot_method,
    read_run,
    table_name,
    write_curves,
)

RUNS = {  # run id -> (method, setting, extra logged scalars)
    "method=didr/beta=0.5/seed=0": ("didr", "beta=0.5", ["drs_norm", "loss_ikl"]),
    "method=didr/beta=0.1/seed=0": ("didr", "beta=0.1", ["drs_norm", "loss_ikl"]),
    "method=dmd2/weight=10/seed=0": ("dmd2", "weight=10", ["loss_dm"]),
}


def write_run(folder, run, method, setting, extra, steps=6, seed=0):
    """An align output's params.json and metrics.parquet (the columns the alignment loop logs), seeded numbers."""
    rng = np.random.default_rng(seed)
    names = ["reward", "loss", "loss_fake", "grad_norm", "grad_norm_fake", "direction_norm", "step_seconds", *extra]
    frame = pd.DataFrame({"step": np.arange(steps, dtype=np.int64), **{n: rng.normal(size=steps) for n in names}})
    folder.mkdir(parents=True)
    frame.to_parquet(folder / "metrics.parquet", index=False)
    record = {"stage": "align", "run": run, "method": method, "setting": setting}
    (folder / "params.json").write_text(json.dumps(record))
    return frame


@pytest.fixture
def runs(tmp_path):
    folders, frames = [], {}
    for i, (run, (method, setting, extra)) in enumerate(RUNS.items()):
        folders.append(tmp_path / "align" / run)
        frames[run] = write_run(folders[-1], run, method, setting, extra, seed=i)
    return folders, frames


def test_curve_tables_hold_the_parquet_numbers(runs):
    folders, frames = runs
    curves = [read_run(folder) for folder in folders]
    for metric in ("reward", "loss", "grad_norm", "drs_norm"):
        table = curve_table(curves, metric)
        assert table["step"].tolist() == list(range(6)) and list(table.columns[1:]) == list(RUNS)
        for run, frame in frames.items():
            if metric in frame:
                np.testing.assert_array_equal(table[run].to_numpy(), frame[metric].to_numpy())
            else:  # dmd2 logs no DRS norm: an empty column
                assert table[run].isna().all() and metric == "drs_norm"


def test_panels_follow_the_order_and_skip_time():
    frame = pd.DataFrame(columns=["step", "step_seconds", "zeta", "drs_norm", "loss", "reward"])
    assert panels([RunCurves("method=x/seed=0", "x", "", frame)]) == ["reward", "loss", "drs_norm", "zeta"]


def test_figure_is_a_png_of_its_panels_size(runs, tmp_path):
    folders, _ = runs
    curves = [read_run(folder) for folder in folders[:2]]
    drawn = plot_method(curves, tmp_path / "didr.png")
    expected = ["reward", "loss", "loss_ikl", "loss_fake", "grad_norm", "grad_norm_fake", "direction_norm", "drs_norm"]
    assert drawn == expected
    with Image.open(tmp_path / "didr.png") as image:
        assert image.format == "PNG"
        assert image.size == figure_size(8) == (1200, 900)  # 3 columns x 3 rows of 4 x 3 inches at 100 dpi


def test_write_curves_writes_a_figure_per_method_and_the_tables(runs, tmp_path):
    folders, frames = runs
    out = tmp_path / "report"
    out.mkdir()
    figures = write_curves(folders, out)
    assert [name for name, _ in figures] == ["curves_didr.png", "curves_dmd2.png"]
    assert "beta=0.5, beta=0.1" in figures[0][1] and "drs_norm" in figures[0][1]
    loss = pd.read_csv(out / table_name("loss"))
    for run, frame in frames.items():
        np.testing.assert_allclose(loss[run].to_numpy(), frame["loss"].to_numpy(), rtol=1e-15)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["curves_didr.png", "curves_dmd2.png", *(table_name(m) for m in TABLES)]
    )


def test_a_run_without_metrics_is_named(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "params.json").write_text("{}")
    with pytest.raises(ValueError, match=f"{folder}/metrics.parquet: missing"):
        read_run(folder)


def test_generated_plots_name_every_run_per_curve():
    plots = {name: spec for entry in pipeline("params.yaml")["plots"] for name, spec in entry.items()}
    for metric in TABLES:
        spec = plots[f"curves_{metric}"]
        assert spec["x"] == "step" and spec["template"] == "linear"
        assert spec["y"] == {f"reports/embedded/{table_name(metric)}": [
            "method=didr/beta=0.03/seed=0", "method=didr/beta=0.01/seed=0", "method=dipp/alpha=3/seed=0",
            "method=dipp/alpha=10/seed=0", "method=dmd2/weight=10/seed=0", "method=dmd2/weight=30/seed=0",
        ]}  # fmt: skip


@pytest.mark.integration  # a dvc subprocess
def test_dvc_plots_show_draws_the_curves(runs, tmp_path):
    folders, frames = runs
    project = tmp_path / "project"
    report = project / "reports" / "x"
    report.mkdir(parents=True)
    write_curves(folders, report)
    plots = [
        {f"curves_{m}": {"template": "linear", "x": "step", "y": {f"reports/x/{table_name(m)}": list(RUNS)}}}
        for m in TABLES
    ]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    shown = subprocess.run([*dvc, "plots", "show", "--json"], cwd=project, check=True, capture_output=True, text=True)
    data = json.loads(shown.stdout)["data"]
    assert sorted(data) == sorted(f"curves_{m}" for m in TABLES)
    values = data["curves_reward"][0]["content"]["data"]["values"]
    for run, frame in frames.items():
        drawn = [float(v["dvc_inferred_y_value"]) for v in values if v["field"] == run]
        assert len(drawn) == 6
        assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(drawn, frame["reward"], strict=True))
