"""GPTQ weight-only quantization (Frantar et al. 2022), with one of two libraries.

- backend llmcompressor (default): llmcompressor's GPTQModifier; saves compressed-tensors
  (vLLM's native format; a later stage of a chain can start from it).
- backend gptqmodel: GPTQModel, AutoGPTQ's maintained successor; saves the GPTQ checkpoint format
  (`quant_method: gptq`) that transformers/optimum, peft, vLLM, SGLang and TGI load. transformers
  runs it on CPU with GPTQModel's int4 ATen kernel (4-bit) or its torch kernel (2/3/8-bit).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Literal

from pydantic import Field

from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError, gptqmodel_backend
from byoai.tasks.techniques.weight_quant import WeightQuantConfig, quantizable_layers, quantize_with_llmcompressor, weight_quant_footprint

# GPTQModel's GPTQ processes columns in blocks of this many (fixed in the library).
GPTQMODEL_BLOCK_SIZE = 128


class GptqConfig(WeightQuantConfig):
    # Which library runs GPTQ (see the module docstring); both run on CPU and CUDA. gptqmodel
    # takes group_size 32/64/128, ignore [lm_head] and block_size 128 only (what transformers
    # runs correctly from its checkpoints); anything else is refused with the reason.
    backend: Literal["llmcompressor", "gptqmodel"] = "llmcompressor"
    # Fraction of the Hessian's mean diagonal added for numerical stability.
    dampening_frac: float = Field(default=0.01, gt=0, lt=1)
    # Columns updated together before the lazy error propagation (speed only, same result).
    block_size: int = Field(default=128, gt=0)
    # Activation ordering (quantize high-activation columns first): "static" reorders columns
    # once (llmcompressor's default, no inference cost); "group" also reorders group indices
    # (desc_act: a g_idx permutation at inference); "group_aware" is GPTQModel's own
    # group-aware reordering (GAR, its default; no inference cost; gptqmodel backend only).
    actorder: Literal["static", "group", "none", "group_aware"] = "static"
    # Where the weights wait while one layer at a time is calibrated: "memory" (all of them in
    # RAM), "disk" (llmcompressor: compressed-tensors' disk cache, read from the checkpoint and
    # written back per layer; gptqmodel: its offload_to_disk), or "auto": disk when the weights
    # take more than a third of the RAM available on a CPU, 80 % of it on a GPU worker
    # (byoai.memory.offloads_to_disk).
    offload: Literal["auto", "disk", "memory"] = "auto"


def _gptqmodel_ordering(config: GptqConfig) -> dict:
    """GPTQModel's flags for an actorder: the same algorithms under AutoGPTQ's names.

    llmcompressor's "static" (its alias of "weight") is AutoGPTQ's desc_act + static_groups:
    group scales come from the original column groups, columns are then quantized in activation
    order, and each column keeps its original group (no permutation at inference).
    """
    if config.actorder == "none":
        return {"desc_act": False, "act_group_aware": False}
    if config.actorder == "group":
        return {"desc_act": True, "act_group_aware": False}
    if config.actorder == "static":
        return {"desc_act": True, "static_groups": True, "act_group_aware": False}
    return {"desc_act": False, "act_group_aware": True}


def _run_gptqmodel(inputs: BuildInputs) -> BuildResult:
    import torch
    from gptqmodel.quantization.config import GPTQConfig

    from byoai.tasks.techniques.io import load_stage_input

    config: GptqConfig = inputs.config
    if config.block_size != GPTQMODEL_BLOCK_SIZE:
        raise TechniqueError(
            f"backend gptqmodel uses a fixed GPTQ block size of {GPTQMODEL_BLOCK_SIZE}; "
            f"remove params.block_size ({config.block_size}) or use backend: llmcompressor"
        )
    gptqmodel_backend.require_only_lm_head_ignored(config.ignore)
    model, tokenizer = load_stage_input(inputs.model_dir)
    layers = quantizable_layers(model, config)  # names the layer a group size does not fit
    gptqmodel_backend.require_supported_group_size(config.group_size)
    quantize_config = GPTQConfig(
        bits=config.bits,
        group_size=config.group_size,
        sym=config.symmetric,
        damp_percent=config.dampening_frac,
        offload_to_disk=gptqmodel_backend.offload_to_disk(config.offload, inputs),
        **_gptqmodel_ordering(config),
    )
    # GPTQModel's defaults: bfloat16 on CPU (its CPU int4 kernel computes in bfloat16 anyway, and
    # the reload check can then reproduce transformers to the bit), float16 on CUDA (its CUDA
    # kernels' precision). Embeddings, lm_head and norms are saved in that dtype.
    dtype = torch.float16 if inputs.device == "cuda" else torch.bfloat16
    with gptqmodel_backend.plain_input(inputs, model, tokenizer) as source:
        del model  # GPTQModel loads its own copy
        facts = gptqmodel_backend.build(inputs, source, tokenizer, quantize_config, dtype=dtype)
    return gptqmodel_backend.finish(
        inputs, facts, format="gptq", quantized_layers=len(layers), ignored=list(config.ignore), actorder=config.actorder
    )


def run(inputs: BuildInputs) -> BuildResult:
    from llmcompressor.modifiers.quantization import GPTQModifier

    config: GptqConfig = inputs.config
    if config.backend == "gptqmodel":
        return _run_gptqmodel(inputs)
    if config.actorder == "group_aware":
        raise TechniqueError(
            "actorder: group_aware is GPTQModel's reordering; use backend: gptqmodel, "
            "or actorder static/group/none with llmcompressor"
        )
    factory = partial(
        GPTQModifier,
        dampening_frac=config.dampening_frac,
        block_size=config.block_size,
        actorder=None if config.actorder == "none" else config.actorder,
    )
    result = quantize_with_llmcompressor(inputs, factory, calibrate=True, offload=config.offload)
    return dataclasses.replace(result, facts={**result.facts, "backend": "llmcompressor", "actorder": config.actorder})


TECHNIQUE = Technique(
    name="gptq",
    summary="GPTQ weight-only quantization with calibration (llmcompressor or GPTQModel)",
    config=GptqConfig,
    # llm-compressor 0.14's GPTQ holds three more float32 copies of the largest (down_proj's)
    # Hessian at once: the stacked working buffer and activation ordering's two gathers
    # (measured: ~1.1 GB above the steady state per layer at the 1B shape, intermediate 8192)
    footprint=weight_quant_footprint(calibrated=True, hessians=True, hessian_copies=3, offloadable=True),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
)
