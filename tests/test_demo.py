"""The demo recipe on the real SmolLM2-135M-Instruct (embedded, offline): the product's promise."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from byoai.cli import app
from byoai.recipe import load_recipe
from flows.optimize import run_optimize
from recipes import RECIPES_DIR

pytestmark = pytest.mark.slow


def test_demo_recipe_promotes_gptq_on_smollm2(workdir):
    recipe = load_recipe(RECIPES_DIR / "demo.yaml")
    summary = run_optimize(recipe)
    rows = {r.variant: r for r in summary.results}
    assert {r.status for r in rows.values()} == {"finished"}
    base, rtn, gptq = rows["baseline"], rows["rtn-w4-g64"], rows["gptq-w4-g64"]
    # 4096 tokens of held-out pydoc text; SmolLM2-135M-Instruct scores ~13.5 in float32
    assert 8 < base.ppl < 25
    # GPTQ (32 x 256 calibration tokens) must not be worse than round-to-nearest at the same group size
    assert gptq.ppl <= rtn.ppl
    assert gptq.size_mb < 0.4 * base.size_mb
    # torchao int8 keeps quality (~+0.5 %) at ~41 % of the size
    int8 = rows["int8-weight-only"]
    assert int8.ppl_delta_pct < 3 and int8.size_mb < 0.45 * base.size_mb
    # one shipped lm-eval task (64 questions, 4 options): the real model is far above chance 0.25
    assert base.task_scores["byoai_pydoc_cloze"] > 0.6
    # gate 25 %: RTN W4 (~+43 %) fails it, GPTQ W4 (~+20 %) passes and is smallest, so it is champion
    decisions = {d["variant"]: d for d in summary.decisions}
    assert decisions["rtn-w4-g64"]["gate"] == "fail"
    assert decisions["gptq-w4-g64"]["gate"] == "pass" and decisions["gptq-w4-g64"]["champion"]
    uri = summary.tracking_uri
    champion = MlflowClient(uri, uri).get_model_version_by_alias(recipe.name, "champion-cpu-x86")
    assert champion.tags["byoai.variant"] == "gptq-w4-g64"
    shown = CliRunner().invoke(app, ["champions", recipe.name])
    assert shown.exit_code == 0 and "gptq-w4-g64" in shown.output
