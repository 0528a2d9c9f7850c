"""Pruning techniques (magnitude, wanda, sparsegpt, sparse24, drop_layers) and pruned chains.

Sparsity is always measured on the artifact reloaded from disk (facts["sparsity"], added by the
build step) as well as over the pruned layers (facts["pruned_sparsity"]): a pruning step whose
zeros do not survive the save, or a later stage that fills them in, must fail here.
"""

from __future__ import annotations

import math

import pytest

from byoai.tasks.build import RELOAD_TOLERANCE
from byoai.tasks.techniques import TechniqueError

# tiny model: 2 layers x (q, k, v, o: 64x64 / 32x64, gate, up: 128x64, down: 64x128) = 14 Linear
TINY_LINEARS = 14


def linear_weights(artifact, as_next_stage: bool = False):
    """The decoder's Linear weights of a saved artifact: reloaded as the build step and evaluation
    load it, or (as_next_stage) decompressed to float as the next stage of a chain sees it."""
    from pathlib import Path

    import torch

    from byoai.tasks.techniques.io import load_model, load_stage_input

    model, _ = (load_stage_input if as_next_stage else load_model)(Path(artifact.path))
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


@pytest.mark.parametrize("technique", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_pruning_reaches_requested_sparsity_after_reload(tiny_bench, technique):
    artifact = tiny_bench.build(technique, {"sparsity": 0.6})
    facts = artifact.facts
    assert facts["reload_rel_err"] <= RELOAD_TOLERANCE
    assert facts["sparsity_requested"] == 0.6 and facts["mask"] == "unstructured"
    assert facts["pruned_layers"] == TINY_LINEARS
    # all decoder Linear layers are pruned, so the reloaded model's sparsity is the pruned layers'
    assert facts["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert facts["pruned_sparsity"] == pytest.approx(facts["sparsity"], abs=1e-6)
    # every layer is pruned on its own, not just the model on average
    for name, weight in linear_weights(artifact).items():
        assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=0.01), name
    metrics = tiny_bench.evaluate(artifact)
    assert math.isfinite(metrics.ppl)


def test_pruning_ignore_keeps_layers_dense(tiny_bench):
    artifact = tiny_bench.build("magnitude", {"sparsity": 0.5, "ignore": ["re:.*mlp.*"]})
    assert artifact.facts["pruned_layers"] == 8  # 2 layers x 4 attention projections
    for name, weight in linear_weights(artifact).items():
        expected = 0.0 if ".mlp." in name else 0.5
        assert float((weight == 0).float().mean()) == pytest.approx(expected, abs=0.01), name


def test_pruning_refuses_an_ignore_list_that_excludes_everything(tiny_bench):
    with pytest.raises(TechniqueError, match="nothing left to prune"):
        tiny_bench.build("magnitude", {"ignore": ["re:.*"]})


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_sparse24_is_exactly_2_4_after_reload(tiny_bench, method):
    from byoai.tasks.techniques.pruning import follows_n_m

    artifact = tiny_bench.build("sparse24", {"method": method})
    assert artifact.facts["method"] == method and artifact.facts["follows_2_4"] is True
    assert artifact.facts["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for name, weight in linear_weights(artifact).items():
        assert follows_n_m(weight, 2, 4), name


def test_sparsegpt_then_gptq_keeps_the_zeros(tiny_bench):
    # llmcompressor 0.14's GPTQ alone moves pruned weights off zero (~600 of them here: its error
    # compensation updates them too); weight_quant makes it quantize them to exactly zero
    pruned = tiny_bench.build("sparsegpt", {"sparsity": 0.5})
    quantized = tiny_bench.build("gptq", {"bits": 4, "group_size": 32}, model=pruned.as_model())
    assert quantized.facts["format"] == "compressed-tensors"
    assert quantized.facts["sparse_layers_preserved"] == TINY_LINEARS
    # the sparsity-aware GPTQ ran: nothing was left for the safety net to re-zero
    assert quantized.facts["zeros_restored"] == 0
    assert quantized.facts["reload_rel_err"] <= RELOAD_TOLERANCE
    # measured on the reloaded artifact: the requested sparsity survives quantization...
    assert quantized.facts["sparsity"] >= 0.49
    assert quantized.size_bytes < pruned.size_bytes
    # ...and it is the same mask: every pruned weight is still exactly zero
    before, after = linear_weights(pruned), linear_weights(quantized, as_next_stage=True)
    for name, weight in before.items():
        assert bool((after[name][weight == 0] == 0).all()), name


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_sparse24_then_quantization_stays_2_4(tiny_bench, quantizer):
    from byoai.tasks.techniques.pruning import follows_n_m

    pruned = tiny_bench.build("sparse24", {"method": "magnitude"})
    quantized = tiny_bench.build(quantizer, {"bits": 4, "group_size": 32}, model=pruned.as_model())
    assert quantized.facts["sparsity"] >= 0.5 and quantized.facts["zeros_restored"] == 0
    for name, weight in linear_weights(quantized, as_next_stage=True).items():
        assert follows_n_m(weight, 2, 4), name


def test_dense_input_is_quantized_without_a_mask(tiny_bench):
    # the zero-preserving path must not trigger on a model that was never pruned
    artifact = tiny_bench.build("gptq", {"bits": 8, "group_size": 32})
    assert artifact.facts["sparse_layers_preserved"] == 0 and artifact.facts["zeros_restored"] == 0


def test_drop_layers_removes_the_least_important_layer(tiny_bench):
    from transformers import AutoConfig

    artifact = tiny_bench.build("drop_layers", {"n_layers": 1})
    facts = artifact.facts
    assert facts["layers_before"] == 2 and facts["layers_after"] == 1
    assert facts["reload_rel_err"] <= RELOAD_TOLERANCE
    scores = {int(i): s for i, s in facts["layer_scores"].items()}
    assert facts["dropped_layers"] == [min(scores, key=scores.get)]
    assert AutoConfig.from_pretrained(artifact.path).num_hidden_layers == 1
    assert 0 < facts["params_removed_fraction"] < 0.5
    # the reloaded model runs generation with a KV cache (layer indices renumbered)
    metrics = tiny_bench.evaluate(artifact)
    assert math.isfinite(metrics.ppl) and metrics.decode_tok_s > 0


def test_drop_layers_keep_and_bounds(tiny_bench):
    artifact = tiny_bench.build("drop_layers", {"n_layers": 1, "keep": [0]})
    assert artifact.facts["dropped_layers"] == [1]
    with pytest.raises(TechniqueError, match="lower params.n_layers"):
        tiny_bench.build("drop_layers", {"n_layers": 2})


def test_drop_layers_angular_block(tiny_bench):
    artifact = tiny_bench.build("drop_layers", {"n_layers": 1, "score": "angular"})
    assert len(artifact.facts["dropped_layers"]) == 1 and artifact.facts["layers_after"] == 1


@pytest.mark.quality
def test_calibrated_pruning_beats_magnitude_on_smollm2(smol_bench):
    # 50 % unstructured on every decoder Linear of SmolLM2-135M; calibration 16 x 256 tokens,
    # perplexity on 2,048 tokens. Same sparsity for all three, so perplexity is comparable.
    results = {}
    for technique in ("magnitude", "wanda", "sparsegpt"):
        artifact = smol_bench.build(technique, {"sparsity": 0.5})
        assert artifact.facts["sparsity"] == pytest.approx(0.5, abs=0.01)
        results[technique] = smol_bench.evaluate(artifact).ppl
    assert results["wanda"] <= results["magnitude"]
    assert results["sparsegpt"] <= results["magnitude"]


@pytest.mark.slow
def test_drop_layers_on_smollm2(smol_bench):
    # 4 of 30 layers by block influence on 16 x 256 calibration tokens; no quality bar, only sanity
    artifact = smol_bench.build("drop_layers", {"n_layers": 4})
    assert artifact.facts["layers_after"] == 26 and len(artifact.facts["dropped_layers"]) == 4
    assert math.isfinite(smol_bench.evaluate(artifact).ppl)


def test_drop_layers_finds_the_decoder_layers_of_gpt_neox(tiny_bench, tiny_model, tmp_path):
    """GPT-NeoX keeps its decoder layers at gpt_neox.layers, not model.layers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from byoai.files import folder_sha256
    from byoai.tasks.build import build_variant
    from byoai.tasks.model import ModelRef

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    neox = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)).save_pretrained(neox)
    tokenizer.save_pretrained(neox)
    ref = ModelRef(path=str(neox), sha=folder_sha256(neox), source="test:neox")
    artifact = build_variant.fn("drop_layers", {"n_layers": 1}, ref, ref, tiny_bench.calibration, "cpu", str(tmp_path / "variants"))
    assert artifact.facts["layers_before"] == 3 and artifact.facts["layers_after"] == 2
    assert len(AutoModelForCausalLM.from_pretrained(artifact.path).gpt_neox.layers) == 2
