"""Runtimes: GGUF export with llama.cpp's own converter and quantizer, measured in llama.cpp
compiled for this worker (infra/install.sh builds it), on a tiny Llama made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from byoai.cli import app
from byoai.recipe import load_recipe, load_target
from byoai.settings import Settings
from byoai.flows.optimize import run_optimize
from byoai.recipes import TARGETS_DIR
from byoai.tasks.runtimes import RUNTIMES
from byoai.tasks.runtimes import llama_cpp
from byoai.tasks.runtimes.llama_cpp import LlamaCppConfig, build_dir, unavailable_reason
from tests.test_flow import mlflow_client, task_states, versions


def test_gguf_in_llama_cpp_scores_like_transformers(gguf_bench):
    base = gguf_bench.build("baseline")
    reference = gguf_bench.evaluate(base)
    f32 = gguf_bench.build("gguf", {"quant_type": "f32"})
    q8 = gguf_bench.build("gguf", {"quant_type": "q8_0"})
    assert f32.format == q8.format == "gguf" and (Path(q8.path) / "model.gguf").is_file()
    # the same token windows through llama.cpp: f32 reproduces transformers, q8_0 stays within 1 %
    in_f32 = gguf_bench.evaluate(f32, runtime="llama_cpp")
    in_q8 = gguf_bench.evaluate(q8, runtime="llama_cpp")
    assert in_f32.runtime == "llama_cpp" and in_f32.ppl_tokens == reference.ppl_tokens
    assert in_f32.ppl == pytest.approx(reference.ppl, rel=1e-3)
    assert in_q8.ppl == pytest.approx(reference.ppl, rel=0.01)
    # the profile: TTFT, decode at batch 1 and 2 (llama.cpp's batched decode), memory and its bound
    for key in ("ttft_ms.p16", "decode_tok_s.b1", "decode_tok_s.b2", "tpot_ms.b2", "weights_mb", "peak_mem_mb", "decode_bound_tok_s"):
        assert in_q8.profile[key] > 0, key
    assert in_q8.profile["weights_mb"] < 0.4 * in_f32.profile["weights_mb"]
    assert "llama.cpp" in in_q8.device and in_q8.runtime_build.startswith("llama_cpp-")
    # facts: the tensor types written, bits per weight, the converter's version
    facts = q8.facts
    assert json.loads(facts["tensor_types"])["Q8_0"] > 0 and 8 < facts["bits_per_weight"] < 9
    assert "convert_hf_to_gguf.py" in facts["converter"] and "llama.cpp 0c1e570" in facts["converter"]
    assert facts["gguf_mb"] < 0.28 * f32.facts["gguf_mb"]


def test_lm_eval_through_llama_cpp_matches_transformers(gguf_bench):
    from byoai.tasks.lm_eval_tasks import LmEvalSpec

    spec = LmEvalSpec(tasks=("byoai_pydoc_cloze",), limit=16)
    f32 = gguf_bench.build("gguf", {"quant_type": "f32"})
    in_hf = gguf_bench.evaluate(gguf_bench.build("baseline"), lm_eval=spec).tasks["byoai_pydoc_cloze"]
    in_llama = gguf_bench.evaluate(f32, runtime="llama_cpp", lm_eval=spec).tasks["byoai_pydoc_cloze"]
    # the same model in two runtimes answers the same questions the same way
    assert in_llama["n"] == in_hf["n"] == 16 and in_llama["value"] == pytest.approx(in_hf["value"], abs=1e-9)


def test_imatrix_changes_the_low_bit_file(gguf_bench):
    plain = gguf_bench.build("gguf", {"quant_type": "q4_k_m"})
    weighted = gguf_bench.build("gguf", {"quant_type": "q4_k_m", "imatrix": True})
    assert weighted.facts["imatrix"] and weighted.facts["imatrix_tokens"] == 8 * 64
    # the same tensor types and sizes, different quantized values
    from gguf import GGUFReader

    tensors = [{t.name: bytes(t.data) for t in GGUFReader(str(Path(a.path) / "model.gguf")).tensors} for a in (plain, weighted)]
    assert tensors[0].keys() == tensors[1].keys() and abs(weighted.size_bytes - plain.size_bytes) < 4096
    changed = [name for name in tensors[0] if tensors[0][name] != tensors[1][name]]
    assert any("ffn" in name or "attn" in name for name in changed), changed
    # hidden 256: the K-quants apply to the layers' rows
    assert "Q4_K" in json.loads(plain.facts["tensor_types"])
    # the importance matrix is computed once per model and windows: another type reuses it
    gguf_bench.build("gguf", {"quant_type": "q4_0", "imatrix": True})
    assert len(list((Path(weighted.path).parent / "gguf-imatrix").glob("*.gguf"))) == 1


def test_a_chain_ending_in_gguf_requantizes_a_quantized_stage(gguf_bench):
    rtn = gguf_bench.build("rtn", {"bits": 8, "group_size": 64})
    chained = gguf_bench.build("gguf", {"quant_type": "q8_0"}, model=rtn.as_model())
    assert "compressed-tensors" in chained.facts["requantized_from"]
    assert gguf_bench.evaluate(chained, runtime="llama_cpp").ppl == pytest.approx(gguf_bench.evaluate(rtn).ppl, rel=0.02)


def test_a_bad_quant_type_or_a_stage_after_gguf_is_a_recipe_error(write_recipe):
    bad = write_recipe(variants="[{name: g, technique: gguf, params: {quant_type: q4_z}}]")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "variants[0]: invalid params for technique 'gguf': params.quant_type" in result.output and "'q4_k_m'" in result.output
    after = write_recipe(variants="[{name: g, stages: [{technique: gguf}, {technique: rtn}]}]")
    result = CliRunner().invoke(app, ["validate", str(after)])
    assert result.exit_code == 2 and "gguf writes gguf, which no later stage can read: put it last" in result.output


def test_a_target_without_a_reference_runtime_or_with_an_unknown_runtime_is_refused(tmp_path):
    from byoai.recipe import RecipeError

    (tmp_path / "t.yaml").write_text("name: t\ndevice: cpu\ntechniques: [onnx]\nruntimes: {onnxruntime_genai: {}}\n")
    with pytest.raises(RecipeError, match="list transformers or llama_cpp"):
        load_target(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("name: t\ndevice: cpu\ntechniques: [gguf]\nruntimes: {transformers: {}, vllm: {}}\n")
    with pytest.raises(RecipeError, match="unknown runtime 'vllm'; allowed: transformers, llama_cpp"):
        load_target(tmp_path / "t.yaml")


def test_builds_this_worker_cannot_run_are_refused_with_the_reason(monkeypatch):
    # a CPU without AMX (some CI machines have it: their /proc/cpuinfo, less it); no NVIDIA GPU on the CI machines
    without_amx = llama_cpp.cpu_flags() - {"amx_tile", "amx_int8", "amx_bf16"}
    monkeypatch.setattr(llama_cpp, "cpu_flags", lambda: without_amx)
    assert "lacks it (no 'amx_tile' in /proc/cpuinfo)" in unavailable_reason(LlamaCppConfig(cmake_args=("-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=ON")), "cpu")
    cuda = load_target(TARGETS_DIR / "cuda-h100.yaml")
    reason = unavailable_reason(cuda.runtime_config("llama_cpp"), "cuda")
    assert reason is None or "CUDA" in reason
    assert unavailable_reason(load_target(TARGETS_DIR / "cpu-x86.yaml").runtime_config("llama_cpp"), "cpu") is None
    # a native build is keyed by this CPU's features, a portable one is not
    native, portable = (load_target(TARGETS_DIR / f"{n}.yaml").runtime_config("llama_cpp") for n in ("cpu-x86", "cpu-x86-avx2"))
    assert native.native and not portable.native and build_dir(native, Path("/c")) != build_dir(portable, Path("/c"))


def test_an_architecture_the_converter_does_not_know_fails_only_its_variant(workdir, write_recipe, gguf_tiny_model):
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_tiny_model)
    torch.manual_seed(0)
    opt = workdir / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)).save_pretrained(opt)
    tokenizer.save_pretrained(opt)
    recipe = load_recipe(write_recipe(
        model=f"{{kind: local, path: {opt}}}", targets="[cpu-x86]",
        variants="[{name: q8, technique: gguf, params: {quant_type: q8_0}}, {name: rtn, technique: rtn, params: {bits: 8, group_size: 64}}]",
    ))
    summary = run_optimize(recipe)
    rows = {r.variant: r for r in summary.results}
    assert rows["rtn"].status == "finished"
    assert rows["q8"].status == "failed"
    assert "llama.cpp's converter (convert_hf_to_gguf.py) cannot convert this model" in rows["q8"].reason
    assert "OPTForCausalLM" in rows["q8"].reason and "not supported" in rows["q8"].reason


def test_a_gguf_variant_is_registered_and_can_be_champion_and_a_rerun_rebuilds_nothing(workdir, write_recipe, gguf_tiny_model):
    recipe = load_recipe(write_recipe(
        model=f"{{kind: local, path: {gguf_tiny_model}}}",
        targets="[cpu-x86]",
        variants="""[{name: baseline, technique: baseline}, {name: q8, technique: gguf, params: {quant_type: q8_0}},
          {name: rtn-q8, stages: [{technique: rtn, params: {bits: 8, group_size: 64}}, {technique: gguf, params: {quant_type: q8_0}}]}]""",
        promotion="{gate: {max_ppl_increase_pct: 5}, objective: smallest}",
    ))
    summary = run_optimize(recipe)
    rows = {(r.variant, r.runtime): r for r in summary.results}
    assert rows["baseline", "transformers"].status == rows["q8", "llama_cpp"].status == rows["rtn-q8", "llama_cpp"].status == "finished"
    q8 = rows["q8", "llama_cpp"]
    assert abs(q8.ppl_delta_pct) < 1 and q8.size_mb < 0.35 * rows["baseline", "transformers"].size_mb
    # the champion is a GGUF version, tagged with its runtime, format, quant type and build
    client = mlflow_client(workdir)
    champion = client.get_model_version_by_alias("tiny", "champion-cpu-x86")
    assert champion.tags["byoai.runtime"] == "llama_cpp" and champion.tags["byoai.format"] == "gguf"
    assert champion.tags["byoai.quant_type"] == "q8_0" and champion.tags["byoai.runtime_build"].startswith("llama_cpp-0.3.36-")
    files = {a.path for a in client.list_artifacts(client.get_run(champion.tags["byoai.run_id"]).info.run_id, "model")}
    assert {"model/model.gguf", "model/tokenizer.json"} <= files
    run = client.get_run(q8.run_id)
    assert run.data.params["runtime.flags"].startswith("-DGGML_NATIVE=ON") and "AVX" in run.data.params["runtime.system_info"]
    # ggml's AMX kernels are left out (they crash on AMX hosts: llama_cpp._X86_COMPILER_FLAGS)
    assert "-mno-amx-int8" in run.data.params["runtime.flags"] and "AMX_INT8 = 1" not in run.data.params["runtime.system_info"]
    shown = CliRunner().invoke(app, ["champions", "tiny"])
    assert shown.exit_code == 0 and "llama_cpp" in shown.output and "q8_0" in shown.output
    # a re-run: nothing rebuilt (variants, GGUF files, the compiled runtime), nothing registered
    runtime = load_target(TARGETS_DIR / "cpu-x86.yaml").runtime_config("llama_cpp")
    marker = build_dir(runtime, Settings().cache_dir.expanduser().resolve()) / ".byoai-runtime.json"
    stamp = marker.stat().st_mtime_ns
    before = [v.version for v in versions(client, "tiny")]
    again = run_optimize(recipe)
    assert [v.version for v in versions(client, "tiny")] == before and marker.stat().st_mtime_ns == stamp
    states = task_states(client.get_run(again.parent_run_id).data.tags["prefect.flow_run_id"])
    heavy = {name: state for name, state in states.items() if name.startswith(("build-", "evaluate", "prepare"))}
    assert len(heavy) >= 8 and set(heavy.values()) == {"Cached"}, heavy


def test_the_capability_matrix_shows_the_runtimes():
    result = CliRunner().invoke(app, ["techniques"])
    assert result.exit_code == 0
    assert "gguf" in result.output and "llama_cpp" in result.output and "cpu-x86-avx2" in result.output
    assert {"transformers", "llama_cpp"} <= set(RUNTIMES)
