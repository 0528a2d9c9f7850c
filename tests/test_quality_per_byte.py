"""Quality per byte in the shipped format: gguf_mixed (a llama.cpp type per tensor under a budget),
qat (distillation onto llama.cpp's grid), on the GGUF-convertible tiny Llama made in the tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from byoai.recipe import RecipeError, load_recipe
from byoai.tasks.techniques import TechniqueError


def gguf_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(path / "model.gguf")).tensors}


def test_the_mixed_file_respects_its_budget_and_writes_the_chosen_types(gguf_bench):
    q4 = gguf_bench.build("gguf", {"quant_type": "q4_0"})
    q8 = gguf_bench.build("gguf", {"quant_type": "q8_0"})
    budget = round((q4.facts["gguf_mb"] + q8.facts["gguf_mb"]) / 2, 3)
    mixed = gguf_bench.build("gguf_mixed", {"max_size_mb": budget, "candidates": ["q4_0", "q5_0", "q8_0"], "windows": 2})
    assert mixed.format == "gguf" and mixed.facts["quant_type"] == "mixed"
    assert q4.facts["gguf_mb"] < mixed.facts["gguf_mb"] <= budget
    chosen = json.loads((Path(mixed.path) / "report" / "tensor_types.json").read_text())
    written = gguf_types(Path(mixed.path))
    assert chosen and all(written[name] == kind for name, kind in chosen.items())
    assert len(set(chosen.values())) >= 2  # a real mix, not one type
    # the choice beats a uniform file on the predicted loss, and the sensitivity table is there
    assert mixed.facts["predicted_kl"] < mixed.facts["predicted_kl.uniform_q4_0"]
    table = (Path(mixed.path) / "report" / "sensitivity.csv").read_text().splitlines()
    assert table[0].startswith("tensor,n_elements,kl_q4_0") and len(table) == len(chosen) + 1
    assert (Path(mixed.path) / "report" / "sensitivity.png").stat().st_size > 1000
    # another budget reuses the sensitivity table measured for the first (most of the cost)
    cached = list((Path(mixed.path).parent / "gguf_mixed-sensitivity").glob("*.json"))
    assert len(cached) == 1 and set(json.loads(cached[0].read_text())["token_embd.weight"]) == {"q4_0", "q5_0", "q8_0"}
    by_bits = gguf_bench.build("gguf_mixed", {"bits_per_weight": 6.0, "candidates": ["q4_0", "q8_0"], "windows": 2})
    assert by_bits.facts["budget"] == "bits_per_weight = 6" and len(cached) == len(list(cached[0].parent.glob("*.json")))
    # the exact measure (one pass per tensor x type) also writes a file within the budget
    exact = gguf_bench.build("gguf_mixed", {"max_size_mb": budget, "candidates": ["q4_0", "q8_0"], "windows": 2, "measure": "kl"})
    assert exact.facts["sensitivity"] == "kl" and exact.facts["gguf_mb"] <= budget
    in_llama = gguf_bench.evaluate(mixed, runtime="llama_cpp")
    assert in_llama.runtime == "llama_cpp" and in_llama.ppl > 0


def test_autoround_writes_a_gguf_that_llama_cpp_runs(gguf_bench, caplog):
    with caplog.at_level(logging.INFO, logger="byoai"):
        rounded = gguf_bench.build("autoround", {"export": "q4_0", "iters": 2, "batch_size": 2})
    assert "building autoround: 2/2 layers" in caplog.text  # its blocks counted as they finish
    assert rounded.format == "gguf" and rounded.facts["library"].startswith("auto-round ")
    types = gguf_types(Path(rounded.path))
    assert types["blk.0.ffn_down.weight"] == types["blk.1.attn_q.weight"] == "q4_0"
    measured = gguf_bench.evaluate(rounded, runtime="llama_cpp")
    assert measured.runtime == "llama_cpp" and measured.ppl > 0


def test_autoround_writes_a_gptq_folder_that_transformers_and_the_onnx_builder_read(tiny_bench):
    reference = tiny_bench.evaluate(tiny_bench.build("baseline"))
    rounded = tiny_bench.build("autoround", {"export": "gptq", "iters": 2, "batch_size": 2, "group_size": 32})
    quantization = json.loads((Path(rounded.path) / "config.json").read_text())["quantization_config"]
    assert rounded.format == "hf" and rounded.facts["format"] == "gptq"
    assert (quantization["quant_method"], quantization["bits"], quantization["group_size"]) == ("gptq", 4, 32)
    assert tiny_bench.evaluate(rounded).ppl == pytest.approx(reference.ppl, rel=0.05)
    exported = tiny_bench.build("onnx", {"precision": "int4", "block_size": 32}, model=rounded.as_model())
    assert exported.facts["kept_quantized_from"].startswith("gptq 4-bit")
    assert tiny_bench.evaluate(exported, runtime="onnxruntime_genai").ppl == pytest.approx(reference.ppl, rel=0.05)


def test_a_budget_below_the_smallest_type_is_a_clear_error(gguf_bench, write_recipe):
    with pytest.raises(TechniqueError, match=r"params\.max_size_mb = 1 is below the smallest file these candidates make"):
        gguf_bench.build("gguf_mixed", {"max_size_mb": 1, "windows": 1})
    with pytest.raises(RecipeError, match="give one budget: max_size_mb"):
        load_recipe(write_recipe(variants="[{name: m, technique: gguf_mixed}]"))


@pytest.mark.parametrize("quant_type", ["q4_0", "q4_1"])
def test_qat_weights_survive_requantization_bit_exactly(gguf_bench, quant_type):
    from gguf import quants
    from safetensors.numpy import load_file

    trained = gguf_bench.build("qat", {"quant_type": quant_type, "steps": 2, "batch_size": 2})
    shipped = gguf_bench.build("gguf", {"quant_type": quant_type}, model=trained.as_model())
    weights = load_file(str(Path(trained.path) / "model.safetensors"))
    config = json.loads((Path(trained.path) / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def as_converted(name: str, w: np.ndarray) -> np.ndarray:
        # llama.cpp's converter reorders the rows of q and k (its RoPE layout); blocks are within rows
        n = heads if name.endswith("q_proj.weight") else kv_heads
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w

    from gguf import GGUFReader

    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    checked = 0
    for tensor in GGUFReader(str(Path(shipped.path) / "model.gguf")).tensors:
        parts = tensor.name.split(".")
        if parts[0] != "blk" or parts[2] not in hf:
            continue
        assert tensor.tensor_type.name.lower() == quant_type, tensor.name
        name = f"model.layers.{parts[1]}.{hf[parts[2]]}.weight"
        stored = quants.dequantize(tensor.data, tensor.tensor_type).reshape(weights[name].shape)
        assert np.array_equal(stored, as_converted(name, weights[name])), tensor.name
        checked += 1
    assert checked == 2 * 7 and trained.facts["on_grid_tensors"] == 2 * 7


def test_qat_brings_q4_0_closer_to_the_model_than_plain_q4_0(gguf_bench):
    """On held-out windows (the test split), the KL divergence of the next-token distribution from
    the unquantized model's: QAT's q4_0 weights against the same model rounded to q4_0 as it is.
    (Perplexity differences on a tiny model are noise-sized; the SmolLM2 benchmark measures them.)"""
    import torch

    from byoai.tasks.data import load_tokens
    from byoai.tasks.techniques.io import load_model
    from byoai.tasks.techniques.qat import decoder_linears, grid

    trained = gguf_bench.build("qat", {"quant_type": "q4_0", "steps": 40, "learning_rate": 1e-5, "batch_size": 4})
    base, _ = load_model(Path(gguf_bench.model.path))
    plain, _ = load_model(Path(gguf_bench.model.path))
    with torch.no_grad():
        for linear in decoder_linears(plain):
            linear.weight.copy_(grid(linear.weight, "q4_0"))
    qat, _ = load_model(Path(trained.path))
    windows = load_tokens(gguf_bench.tokens)

    def kl(model) -> float:
        with torch.inference_mode():
            p = torch.log_softmax(base(windows).logits, -1)
            q = torch.log_softmax(model(windows).logits, -1)
            return (p.exp() * (p - q)).sum(-1).mean().item()

    assert kl(qat) < 0.8 * kl(plain), (kl(qat), kl(plain))


@pytest.mark.quality
def test_qat_lowers_q4_0_perplexity_in_llama_cpp_on_smollm2(smol_bench):
    """Held-out perplexity in llama.cpp: qat -> gguf q4_0 against gguf q4_0 of the same model.
    On the tiny model q4_0 costs about 0.3 % perplexity even once it is trained on the pydoc text
    (measured: 392.6 -> 393.7), less than QAT's own training moves it, so the perplexity claim is
    tested where q4_0 measurably hurts; the tiny-model test above measures the KL instead."""
    plain = smol_bench.evaluate(smol_bench.build("gguf", {"quant_type": "q4_0"}), runtime="llama_cpp")
    trained = smol_bench.build("qat", {"quant_type": "q4_0", "steps": 12, "batch_size": 2})
    qat = smol_bench.evaluate(smol_bench.build("gguf", {"quant_type": "q4_0"}, model=trained.as_model()), runtime="llama_cpp")
    assert qat.ppl < plain.ppl, (qat.ppl, plain.ppl)
