"""Runtime onnxruntime_genai and the onnx stage (onnxruntime-genai's model builder), on a tiny
Llama made here: measured by the same protocol as transformers and llama.cpp."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from byoai.cli import app
from byoai.flows.optimize import run_optimize
from byoai.recipe import load_recipe
from byoai.tasks.runtimes import RUNTIMES
from byoai.tasks.techniques import TECHNIQUES
from tests.test_flow import mlflow_client


def test_onnx_in_onnxruntime_genai_scores_like_transformers(tiny_bench):
    reference = tiny_bench.evaluate(tiny_bench.build("baseline"))
    fp32 = tiny_bench.build("onnx", {"precision": "fp32"})
    int8 = tiny_bench.build("onnx", {"precision": "int8"})
    int4 = tiny_bench.build("onnx", {"precision": "int4", "block_size": 32, "algo": "k_quant"})
    for artifact in (fp32, int8, int4):
        assert artifact.format == "onnx"
        assert {"genai_config.json", "model.onnx", "tokenizer.json"} <= {f.name for f in Path(artifact.path).iterdir()}
    in_fp32, in_int8, in_int4 = (tiny_bench.evaluate(a, runtime="onnxruntime_genai") for a in (fp32, int8, int4))
    # the same token windows: fp32 reproduces transformers, int8 stays within 2 %
    assert in_fp32.runtime == "onnxruntime_genai" and in_fp32.ppl_tokens == reference.ppl_tokens
    assert in_fp32.ppl == pytest.approx(reference.ppl, rel=1e-3)
    assert in_int8.ppl == pytest.approx(reference.ppl, rel=0.02)
    assert in_int4.ppl == pytest.approx(reference.ppl, rel=0.25)
    for key in ("ttft_ms.p16", "decode_tok_s.b1", "decode_tok_s.b2", "tpot_ms.b2", "weights_mb", "peak_mem_mb", "decode_bound_tok_s"):
        assert in_int4.profile[key] > 0, key
    assert "onnxruntime-genai 0.18.0" in in_int4.device and in_int4.runtime_build.startswith("ortgenai-0.18.0-")
    # the builder wrote weight-only MatMulNBits for every Linear and says so
    assert int4.facts["matmul_nbits"] >= 2 * 4 + 1 and int4.facts["quant_type"] == "int4-b32-sym-k_quant"
    assert fp32.facts["matmul_nbits"] == 0 and fp32.facts["quant_type"] == "fp32"
    assert int4.facts["onnx_mb"] < 0.45 * fp32.facts["onnx_mb"] and int8.facts["onnx_mb"] < 0.6 * fp32.facts["onnx_mb"]


def test_int4_with_the_lm_head_in_int8(tiny_bench):
    int4 = tiny_bench.build("onnx", {"precision": "int4", "block_size": 32})
    mixed = tiny_bench.build("onnx", {"precision": "int4", "block_size": 32, "int8_matmuls": ["last_matmul"]})
    assert int4.facts["matmul_nbits_int8"] == 0
    assert mixed.facts["matmul_nbits_int8"] == 1 and mixed.facts["matmul_nbits"] == int4.facts["matmul_nbits"]
    assert mixed.facts["quant_type"] == "int4-b32-sym-rtn-last_matmul-int8"
    assert mixed.facts["onnx_mb"] > int4.facts["onnx_mb"]
    ran = tiny_bench.evaluate(mixed, runtime="onnxruntime_genai")
    assert ran.ppl == pytest.approx(tiny_bench.evaluate(tiny_bench.build("baseline")).ppl, rel=0.25)
    with pytest.raises(ValueError, match="int8_matmuls keeps MatMuls in int8 inside an int4 model"):
        TECHNIQUES["onnx"].config(precision="int8", int8_matmuls=["last_matmul"])


def test_static_int8_quantizes_activations_with_calibrated_ranges(tiny_bench):
    reference = tiny_bench.evaluate(tiny_bench.build("baseline"))
    static = tiny_bench.build("onnx_static")
    # every MatMul's activation goes through a QuantizeLinear whose range the calibration set
    assert static.facts["quantize_linear"] >= 2 * 4 + 1 and static.facts["matmul_nbits"] == 0
    assert static.facts["calibration_windows"] == 8 and static.facts["quant_type"] == "int8-static-minmax"
    measured = tiny_bench.evaluate(static, runtime="onnxruntime_genai")
    assert measured.ppl == pytest.approx(reference.ppl, rel=0.02)


def test_lm_eval_through_onnxruntime_genai_matches_transformers(tiny_bench):
    from byoai.tasks.lm_eval_tasks import LmEvalSpec

    spec = LmEvalSpec(tasks=("byoai_pydoc_cloze",), limit=8)
    in_hf = tiny_bench.evaluate(tiny_bench.build("baseline"), lm_eval=spec).tasks["byoai_pydoc_cloze"]
    fp32 = tiny_bench.build("onnx", {"precision": "fp32"})
    in_ort = tiny_bench.evaluate(fp32, runtime="onnxruntime_genai", lm_eval=spec).tasks["byoai_pydoc_cloze"]
    assert in_ort["n"] == in_hf["n"] == 8 and in_ort["value"] == pytest.approx(in_hf["value"], abs=1e-9)


def test_a_gptq_checkpoint_is_exported_as_it_is(tiny_bench):
    gptq = tiny_bench.build("gptq", {"bits": 4, "group_size": 32, "backend": "gptqmodel"})
    onnx = tiny_bench.build("onnx", {"precision": "int4", "block_size": 32}, model=gptq.as_model())
    assert onnx.facts["kept_quantized_from"].startswith("gptq 4-bit")
    in_hf = tiny_bench.evaluate(gptq)
    in_ort = tiny_bench.evaluate(onnx, runtime="onnxruntime_genai")
    # the GPTQ weights, not a re-quantization of them: the same perplexity in both runtimes
    assert in_ort.ppl == pytest.approx(in_hf.ppl, rel=0.01)


def test_an_onnx_variant_is_registered_and_an_unreadable_input_fails_only_its_variant(workdir, write_recipe):
    recipe = load_recipe(write_recipe(
        targets="[cpu-x86]",
        variants="""[{name: onnx-int4, technique: onnx, params: {precision: int4, block_size: 32}},
          {name: ct-onnx, stages: [{technique: rtn, params: {bits: 4, group_size: 32}}, {technique: onnx}]}]""",
        promotion="{gate: {max_ppl_increase_pct: 50}, objective: smallest}",
    ))
    summary = run_optimize(recipe)
    rows = {r.variant: r for r in summary.results}
    assert rows["onnx-int4"].status == "finished" and rows["onnx-int4"].runtime == "onnxruntime_genai"
    assert rows["ct-onnx"].status == "failed"
    assert "onnx cannot export this input: this input is a compressed-tensors checkpoint" in rows["ct-onnx"].reason
    assert "GPTQ or AWQ checkpoint" in rows["ct-onnx"].reason
    client = mlflow_client(workdir)
    champion = client.get_model_version_by_alias("tiny", "champion-cpu-x86")
    assert champion.tags["byoai.runtime"] == "onnxruntime_genai" and champion.tags["byoai.format"] == "onnx"
    assert champion.tags["byoai.quant_type"] == "int4-b32-sym-rtn"
    files = {a.path for a in client.list_artifacts(champion.tags["byoai.run_id"], "model")}
    assert {"model/genai_config.json", "model/model.onnx", "model/tokenizer.json"} <= files


def test_the_capability_matrix_shows_the_onnx_stage_and_runtime():
    result = CliRunner().invoke(app, ["techniques"])
    assert result.exit_code == 0 and "onnx" in result.output and "onnxruntime_genai" in result.output
    assert set(RUNTIMES) == {"transformers", "llama_cpp", "onnxruntime_genai"}
    assert TECHNIQUES["onnx"].output_format == "onnx" and RUNTIMES["onnxruntime_genai"].formats == {"onnx"}
