"""The demo recipe on the real SmolLM2-135M-Instruct (embedded, offline): the product's promise."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from byoai.cli import app
from byoai.recipe import load_recipe
from byoai.flows.optimize import run_optimize
from byoai.recipes import RECIPES_DIR

pytestmark = pytest.mark.slow


def test_demo_recipe_promotes_a_gguf_in_llama_cpp_on_smollm2(workdir):
    recipe = load_recipe(RECIPES_DIR / "demo.yaml")
    summary = run_optimize(recipe)
    rows = {r.variant: r for r in summary.results}
    assert {r.status for r in rows.values()} == {"finished"}, [(r.variant, r.reason) for r in summary.results]
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
    # the GGUF variants, measured in llama.cpp compiled for this CPU: q8_0 keeps quality; the
    # embedded model's own Q4_1 file, run as it is, is the `input` row
    q8, q4 = rows["gguf-q8_0"], rows["gguf-q4_k_m-imatrix"]
    assert q8.runtime == q4.runtime == rows["input"].runtime == "llama_cpp"
    assert abs(q8.ppl_delta_pct) < 2 and q8.size_mb < 0.3 * base.size_mb
    assert abs(rows["input"].ppl_delta_pct) < 2 and rows["input"].version is None
    # gate 25 %: RTN W4 (~+43 %) fails it; the smallest gated variant is the mixed GGUF under the
    # input's size, and it beats the input file (the embedded Q4_1, 98.4 MB) on the objective
    decisions = {d["variant"]: d for d in summary.decisions}
    assert decisions["rtn-w4-g64"]["gate"] == "fail" and decisions["gptq-w4-g64"]["gate"] == "pass"
    mixed = rows["gguf-mixed-under-input"]
    assert mixed.size_mb < rows["input"].size_mb < q4.size_mb and decisions["gguf-mixed-under-input"]["champion"]
    assert decisions["input"]["reason"].startswith("champion-cpu-x86 (gguf-mixed-under-input) beats the input file on size_mb:")
    uri = summary.tracking_uri
    mlflow = MlflowClient(uri, uri)
    champion = mlflow.get_model_version_by_alias(recipe.name, "champion-cpu-x86")
    assert champion.tags["byoai.variant"] == "gguf-mixed-under-input" and champion.tags["byoai.runtime"] == "llama_cpp"
    assert champion.tags["byoai.runtime_build"].startswith("llama_cpp-0.3.36-")
    assert f"**champion-cpu-x86** since run `{summary.parent_run_id}`" in champion.description
    # what a user downloads: the GGUF, its card and a marker with no path of this machine
    folder = Path(mlflow.download_artifacts(champion.run_id, "model", str(workdir / "download")))
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nbase_model_relation: quantized\nlibrary_name: gguf\nlicense: apache-2.0\n")
    assert "llama-server -m" in card and f"sha `{recipe.sha()}`" in card and "| cpu-x86 | llama_cpp |" in card and "imatrix" in card
    assert str(workdir) not in (folder / ".byoai-artifact.json").read_text() and (folder / "model.gguf").is_file()
    shown = CliRunner().invoke(app, ["champions", recipe.name])
    # the table is 180 columns wide off a terminal: long cells end in an ellipsis
    assert shown.exit_code == 0 and "gguf-mixed" in shown.output and "llama_cpp" in shown.output
