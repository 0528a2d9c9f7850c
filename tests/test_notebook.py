"""The results notebook runs top to bottom on a real flow run's MLflow data (so it cannot rot)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from byoai.recipe import load_recipe
from byoai.flows.optimize import run_optimize

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "results.ipynb"


def test_results_notebook_executes(write_recipe, workdir, monkeypatch):
    summary = run_optimize(load_recipe(write_recipe(targets="[cpu-x86]", variants="[{name: rtn-w4-g32, technique: rtn, params: {group_size: 32}}]")))
    monkeypatch.setenv("BYOAI_NOTEBOOK_TRACKING_URI", summary.tracking_uri)
    monkeypatch.setenv("BYOAI_NOTEBOOK_RUN_ID", summary.parent_run_id)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    outputs = "".join(str(o) for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert summary.parent_run_id in outputs and "rtn-w4-g32" in outputs and "FINISHED" in outputs
    assert "image/png" in outputs  # the plot was drawn


def test_report_command_rebuilds_the_report_from_mlflow(write_recipe, workdir):
    from typer.testing import CliRunner

    from byoai.cli import app

    summary = run_optimize(load_recipe(write_recipe(targets="[cpu-x86]", variants="[{name: rtn-w4-g32, technique: rtn, params: {group_size: 32}}]")))
    # the flow logged the report beside its tables
    from mlflow import MlflowClient

    logged = {a.path for a in MlflowClient(summary.tracking_uri).list_artifacts(summary.parent_run_id, "report")}
    assert logged == {"report/report.md", "report/report.html", "report/pareto-cpu-x86.png"}
    result = CliRunner().invoke(app, ["report", summary.parent_run_id, "--out", str(workdir / "rep")])
    assert result.exit_code == 0, result.output
    markdown = (workdir / "rep" / "report.md").read_text()
    assert "rtn-w4-g32" in markdown and "champion-cpu-x86: v" in markdown and "pareto-cpu-x86.png" in markdown
    # the performance profile per target: TTFT per prompt length (the recipe's 8, 16, 32) and
    # decode speed per batch size (1, 2) with their spread, memory and the bandwidth bound
    profile = markdown.split("## Performance profile")[1]
    for column in ("TTFT ms p8", "TTFT ms p16", "TTFT ms p32", "decode tok/s b1", "decode tok/s b2", "TPOT ms b2", "peak mem MB", "decode bound tok/s"):
        assert column in profile
    assert "–" in profile.split("rtn-w4-g32")[1].splitlines()[0]  # a [min–max] spread
    assert (workdir / "rep" / "pareto-cpu-x86.png").stat().st_size > 10_000
    assert "<table>" in (workdir / "rep" / "report.html").read_text()
    assert CliRunner().invoke(app, ["report", "0" * 32]).exit_code == 2
