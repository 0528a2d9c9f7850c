"""gptq and awq with each backend (llmcompressor, gptqmodel): builds, reload checks, facts, errors.

Fast tests use the tiny Llama; the `quality` ones (not in CI: pytest -m quality) compare quality
with RTN on SmolLM2-135M.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from byoai.tasks.build import RELOAD_TOLERANCE
from byoai.tasks.techniques import TechniqueError


@pytest.fixture(scope="module")
def wide_bench(tmp_path_factory):
    """A tiny Llama wide enough for GPTQModel's AWQ: every output width a multiple of 64.

    The shared tiny model (hidden 64, 2 KV heads of 16) has 32-wide k/v projections, which
    GPTQModel's AWQ clipping search refuses (see test_gptqmodel_awq_refuses_narrow_layers).
    """
    from byoai.files import folder_sha256
    from byoai.tasks.model import ModelRef
    from tests.conftest import Bench
    from tests.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("wide") / "model", hidden=128, intermediate=256)
    ref = ModelRef(path=str(folder), sha=folder_sha256(folder), source="test:tiny-wide")
    return Bench(ref, tmp_path_factory.mktemp("wide-bench"), n_samples=8, seq_len=64, eval_tokens=512, eval_seq_len=128)


def _assert_reloads_and_runs(bench, artifact):
    # the build step reloaded the folder with transformers and matched the reference logits
    assert artifact.facts["reload_rel_err"] <= RELOAD_TOLERANCE
    metrics = bench.evaluate(artifact)
    assert math.isfinite(metrics.ppl) and metrics.ppl > 1
    return metrics


# ---------------------------------------------------------------- GPTQ, gptqmodel backend
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_gptqmodel_4bit_builds_and_reloads_in_transformers(tiny_bench, symmetric):
    artifact = tiny_bench.build("gptq", {"backend": "gptqmodel", "bits": 4, "group_size": 32, "symmetric": symmetric})
    facts = artifact.facts
    assert facts["backend"] == "gptqmodel" and facts["library"].startswith("gptqmodel ")
    assert facts["format"] == "gptq" and facts["quant_method"] == "gptq" and facts["checkpoint_format"] == "gptq"
    assert (facts["bits"], facts["group_size"], facts["sym"], facts["quantized_layers"]) == (4, 32, symmetric, 14)
    # actorder "static" (the default) is AutoGPTQ's desc_act + static groups
    assert facts["desc_act"] is True and facts["static_groups"] is True
    # GPTQModel's CPU default: embeddings, lm_head and norms are saved in bf16
    assert facts["unquantized_dtype"] == "bfloat16"
    # 4-bit: GPTQModel's own loader with the int4 kernel transformers picks agrees to the bit.
    # Asymmetric matters: GPTQModel's float32 default kernel decodes it wrongly; this one does not.
    assert facts["probe_reference"] == "gptqmodel loader (gptq_torch_aten kernel)"
    assert facts["reload_rel_err"] < 1e-5
    _assert_reloads_and_runs(tiny_bench, artifact)
    baseline = tiny_bench.build("baseline")
    assert artifact.size_bytes < baseline.size_bytes
    # GPTQModel rewrites the generation config (do_sample on); the input's is kept
    saved = (Path(artifact.path) / "generation_config.json").read_text()
    assert saved == (Path(baseline.path) / "generation_config.json").read_text()


def test_gptq_gptqmodel_8bit_checked_against_dequantized_weights(tiny_bench, caplog):
    # 2/3/8-bit: GPTQModel's own loader has no float32 kernel, so the reference is the checkpoint
    # dequantized by GPTQModel into a dense model; transformers' float32 torch kernel must match
    with caplog.at_level(logging.INFO, logger="byoai"):
        artifact = tiny_bench.build("gptq", {"backend": "gptqmodel", "bits": 8, "group_size": 32, "actorder": "none"})
    # GPTQModel's per-layer callback counted the build's layers (the console row's progress)
    assert "building gptq: 2/2 layers" in caplog.text
    assert artifact.facts["probe_reference"] == "gptqmodel dequantized to dense float32"
    assert artifact.facts["desc_act"] is False and artifact.facts["act_group_aware"] is False
    _assert_reloads_and_runs(tiny_bench, artifact)


def test_gptq_llmcompressor_stays_the_default_and_can_keep_the_weights_on_disk(tiny_bench):
    from safetensors.torch import load_file

    artifact = tiny_bench.build("gptq", {"bits": 4, "group_size": 32})
    assert artifact.facts["backend"] == "llmcompressor" and artifact.facts["format"] == "compressed-tensors"
    assert artifact.facts["reload_rel_err"] <= RELOAD_TOLERANCE
    assert artifact.facts["weights"] == "memory"  # offload auto: the tiny model is far below a third of the RAM
    # compressed-tensors' disk cache: the same GPTQ, one layer in memory at a time
    on_disk = tiny_bench.build("gptq", {"bits": 4, "group_size": 32, "offload": "disk"})
    assert on_disk.facts["weights"] == "disk" and on_disk.facts["reload_rel_err"] <= RELOAD_TOLERANCE
    assert not list(Path(on_disk.path).parent.glob(".offload-*"))  # its disk cache is removed
    in_memory, offloaded = load_file(Path(artifact.path) / "model.safetensors"), load_file(Path(on_disk.path) / "model.safetensors")
    assert in_memory.keys() == offloaded.keys()
    # the same observer scales; GPTQ's rounding may differ where float sums do (as between two in-memory runs)
    scales = [k for k in in_memory if k.endswith("weight_scale")]
    assert scales and all((in_memory[k] == offloaded[k]).all() for k in scales)
    packed = [k for k in in_memory if k.endswith("weight_packed")]
    same = sum(int((in_memory[k] == offloaded[k]).sum()) for k in packed) / sum(in_memory[k].numel() for k in packed)
    assert same > 0.5, same
    # an earlier stage's compressed output is decoded in memory: it cannot stay on disk
    first = tiny_bench.build("rtn", {"bits": 8, "group_size": 32})
    with pytest.raises(TechniqueError, match="offload: disk needs a plain checkpoint"):
        tiny_bench.build("gptq", {"bits": 4, "group_size": 32, "offload": "disk"}, model=first.as_model())


def test_gptqmodel_stage_after_a_compressed_tensors_stage(tiny_bench):
    # GPTQModel reads folders: an llmcompressor output is decoded and handed over dense
    first = tiny_bench.build("rtn", {"bits": 8, "group_size": 32})
    second = tiny_bench.build("gptq", {"backend": "gptqmodel", "bits": 4, "group_size": 32}, model=first.as_model())
    assert second.facts["reload_rel_err"] <= RELOAD_TOLERANCE and second.size_bytes < first.size_bytes
    # the GPTQ checkpoint format cannot be decoded for a further stage: it must come last
    with pytest.raises(TechniqueError, match="put this quantization last"):
        tiny_bench.build("rtn", {"bits": 4, "group_size": 32}, model=second.as_model())


def test_group_size_error_names_the_layer_with_each_backend(tiny_bench):
    # 48 does not divide the 64-wide attention inputs: refused before any calibration
    for technique, backend in [("gptq", "gptqmodel"), ("gptq", "llmcompressor"), ("awq", "gptqmodel"), ("awq", "llmcompressor")]:
        with pytest.raises(TechniqueError, match=r"group_size 48 does not divide .* layer 'model\.layers\.0\.self_attn\.q_proj'"):
            tiny_bench.build(technique, {"backend": backend, "group_size": 48})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"block_size": 64}, "fixed GPTQ block size of 128"),
        ({"ignore": ["lm_head", "re:.*down_proj"]}, "keeps exactly lm_head"),
        ({"ignore": []}, "keeps exactly lm_head"),
        # 16 divides every layer, but torch's int4 CPU matmul that runs the checkpoint refuses it
        ({"group_size": 16}, "supports group_size 32, 64, 128"),
        ({"group_size": -1}, "supports group_size 32, 64, 128"),
    ],
)
def test_gptqmodel_refuses_what_it_cannot_do(tiny_bench, params, message):
    with pytest.raises(TechniqueError, match=message):
        tiny_bench.build("gptq", {"backend": "gptqmodel", "group_size": 32, **params})


def test_llmcompressor_refuses_gptqmodel_only_ordering(tiny_bench):
    with pytest.raises(TechniqueError, match="group_aware is GPTQModel's"):
        tiny_bench.build("gptq", {"group_size": 32, "actorder": "group_aware"})


# ---------------------------------------------------------------- AWQ
def test_awq_llmcompressor_builds_and_reloads(tiny_bench):
    artifact = tiny_bench.build("awq", {"group_size": 32})
    facts = artifact.facts
    assert facts["backend"] == "llmcompressor" and facts["format"] == "compressed-tensors"
    assert (facts["bits"], facts["zero_point"], facts["quantized_layers"]) == (4, True, 14)
    _assert_reloads_and_runs(tiny_bench, artifact)


def test_gptqmodel_awq_builds_and_reloads_in_transformers(wide_bench):
    artifact = wide_bench.build("awq", {"backend": "gptqmodel", "group_size": 32})
    facts = artifact.facts
    assert facts["backend"] == "gptqmodel" and facts["format"] == "awq-gemm" and facts["quant_method"] == "awq"
    assert (facts["bits"], facts["group_size"], facts["zero_point"], facts["quantized_layers"]) == (4, 32, True, 14)
    # GPTQModel's AWQ runs on CPU only in bf16: the unquantized tensors are saved in bf16
    assert facts["unquantized_dtype"] == "bfloat16"
    assert facts["probe_reference"] == "gptqmodel loader (awq_torch_aten kernel)"
    assert facts["reload_rel_err"] < 1e-5
    _assert_reloads_and_runs(wide_bench, artifact)


def test_gptqmodel_awq_refuses_narrow_layers(tiny_bench):
    with pytest.raises(TechniqueError, match=r"multiple of 64 .* layer 'model\.layers\.0\.self_attn\.k_proj' has 32"):
        tiny_bench.build("awq", {"backend": "gptqmodel", "group_size": 32})


def test_gptqmodel_awq_refuses_llmcompressor_knobs(tiny_bench):
    with pytest.raises(TechniqueError, match="n_grid and params.duo_scaling"):
        tiny_bench.build("awq", {"backend": "gptqmodel", "group_size": 32, "n_grid": 10})


# ---------------------------------------------------------------- quality on SmolLM2-135M
# smol_bench: 16 x 256 calibration tokens, 2,048 evaluation tokens. Group 64: 128 does not divide
# SmolLM2's 576-wide layers. RTN (no calibration) is the floor every calibrated method must beat,
# with the same grid: symmetric for GPTQ (its default), with zero points for AWQ (its default).
@pytest.fixture(scope="module")
def smol_rtn(smol_bench):
    return smol_bench.evaluate(smol_bench.build("rtn", {"bits": 4, "group_size": 64}))


@pytest.fixture(scope="module")
def smol_rtn_asym(smol_bench):
    return smol_bench.evaluate(smol_bench.build("rtn", {"bits": 4, "group_size": 64, "symmetric": False}))


@pytest.mark.quality
@pytest.mark.parametrize("backend", ["llmcompressor", "gptqmodel"])
def test_gptq_beats_rtn_on_smollm2(smol_bench, smol_rtn, backend):
    artifact = smol_bench.build("gptq", {"backend": backend, "bits": 4, "group_size": 64})
    assert artifact.facts["reload_rel_err"] <= RELOAD_TOLERANCE
    gptq = smol_bench.evaluate(artifact)
    assert gptq.ppl <= smol_rtn.ppl


@pytest.fixture(scope="module")
def smol_bench_small_calibration(smollm2, tmp_path_factory):
    """SmolLM2 with 8 x 128 calibration tokens and smol_bench's 2,048 evaluation tokens."""
    from tests.conftest import Bench

    return Bench(smollm2, tmp_path_factory.mktemp("smol-small"), n_samples=8, seq_len=128, eval_tokens=2048, eval_seq_len=512)


@pytest.mark.quality
def test_awq_llmcompressor_beats_rtn_on_smollm2(smol_bench_small_calibration, smol_rtn_asym):
    # 8 x 128 calibration tokens (~4 min here with 16 x 256); evaluated on the same 2,048 tokens
    # as smol_rtn_asym
    artifact = smol_bench_small_calibration.build("awq", {"group_size": 64})
    assert artifact.facts["reload_rel_err"] <= RELOAD_TOLERANCE
    assert smol_bench_small_calibration.evaluate(artifact).ppl <= smol_rtn_asym.ppl
