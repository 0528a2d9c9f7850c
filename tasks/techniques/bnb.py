"""bitsandbytes quantization: LLM.int8() (Dettmers et al. 2022) or 4-bit NF4/FP4 (QLoRA, 2023).

transformers quantizes the Linear layers while loading the dense input (`BitsAndBytesConfig`);
nothing is calibrated. Two ways to ship the result:

- `prequantized`: bitsandbytes' own quantized weights (int8 + scales, or packed 4-bit + absmax),
  the small checkpoint. Saved *before the first forward pass*: on CPUs with AVX512-BF16,
  bitsandbytes 0.50.2 repacks a 4-bit weight for its CPU kernel on the first forward, and
  `save_pretrained` after that writes absmax in the repacked (transposed) layout without undoing it,
  so the reloaded model gets wrong scales, silently (relative logit error ~4e-2 for NF4/FP4,
  ~2.5e-3 with double quantization, which is also re-quantized). The saved folder is exact when
  nothing ran before the save; the build step's reload check catches the corruption if it ever
  happens anyway (tests/test_techniques_int8.py reproduces it).
- `load_time`: the dense input weights plus a `quantization_config` that `io.load_model` applies at
  every load (written to byoai_load.json). Quantization is deterministic, so every load computes what
  the build computed; the disk holds the dense size, `facts["memory_bytes"]` the quantized one.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from byoai.memory import loads_model
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError, probe_ids


class BnbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # int8: LLM.int8() (8-bit rows + fp16 outlier columns), near-lossless, ~half of fp16.
    # nf4: 4-bit NormalFloat (quantiles of a normal, best for normally distributed weights).
    # fp4: 4-bit float; usually a little worse than nf4, kept for comparison.
    mode: Literal["int8", "nf4", "fp4"] = "nf4"
    # 4-bit only: quantize the per-block absmax scales too (8-bit, blocks of 256), saving
    # ~0.37 bits per weight at almost no quality cost.
    double_quant: bool = False
    # 4-bit only: the dtype weights are dequantized to for the matmul. None means float32
    # (transformers' default, exact on CPU); float16/bfloat16 are faster on GPUs.
    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    # int8 only: activation magnitude above which a feature column stays in 16-bit (the
    # paper's 6.0); 0 quantizes everything. None means 6.0.
    int8_threshold: float | None = Field(default=None, ge=0)
    # prequantized: save bitsandbytes' quantized weights (small on disk).
    # load_time: save the dense weights and quantize at every load (see the module docstring).
    serialization: Literal["prequantized", "load_time"] = "prequantized"

    @model_validator(mode="after")
    def _mode_specific(self) -> BnbConfig:
        if self.mode == "int8" and (self.double_quant or self.compute_dtype is not None):
            raise ValueError(
                "double_quant and compute_dtype apply to the 4-bit modes only; remove them or use mode nf4/fp4"
            )
        if self.mode != "int8" and self.int8_threshold is not None:
            raise ValueError("int8_threshold applies to mode int8 only; remove it or use mode int8")
        return self


def quantization_config(config: BnbConfig):
    import torch
    from transformers import BitsAndBytesConfig

    if config.mode == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=6.0 if config.int8_threshold is None else config.int8_threshold
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.mode,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype or "float32"),
    )


def load_quantized(inputs: BuildInputs, quantization, dense_dir: Path | None = None):
    """The stage input quantized by transformers while loading, as `io.load_model` will reload it.

    transformers quantizes only while loading a checkpoint, and the input may be an earlier
    stage's compressed-tensors folder: the dense float32 weights are saved to `dense_dir` (a temporary
    folder if None) and loaded from there with the quantization config.
    """
    from byoai.tasks.techniques.io import load_model, load_stage_input, save_model

    model, tokenizer = load_stage_input(inputs.model_dir)
    with tempfile.TemporaryDirectory(prefix="byoai-dense-") as tmp:
        folder = dense_dir or Path(tmp)
        save_model(model, tokenizer, folder)
        del model
        quantized, _ = load_model(folder, quantization_config=quantization, device_map=inputs.device)
    return quantized, tokenizer


def memory_bytes(model) -> int:
    """Bytes the quantized model holds: parameters and buffers plus bitsandbytes' quantization state.

    `get_memory_footprint` counts a 4-bit weight's packed bytes but not its absmax scales (+12.5 %
    at blocks of 64 in float32), nor an 8-bit weight's row scales; they are added here.
    """
    import bitsandbytes as bnb

    total = model.get_memory_footprint()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        extra = []
        if isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None:
            state = weight.quant_state
            extra = [state.absmax, state.offset] + ([state.state2.absmax] if state.nested else [])
        elif isinstance(weight, bnb.nn.Int8Params):
            extra = [weight.SCB]
        total += sum(t.numel() * t.element_size() for t in extra if t is not None)
    return total


def run(inputs: BuildInputs) -> BuildResult:
    import bitsandbytes as bnb

    from byoai.tasks.techniques.io import logits, save_model

    config: BnbConfig = inputs.config
    if inputs.device not in TECHNIQUE.devices:
        raise TechniqueError(f"bitsandbytes runs on {', '.join(sorted(TECHNIQUE.devices))}, not on {inputs.device}")
    quantization = quantization_config(config)
    if config.serialization == "load_time":
        # The dense input goes straight into the output folder; the build step writes the
        # quantization config beside it (byoai_load.json) and its reload check loads both.
        model, tokenizer = load_quantized(inputs, quantization, dense_dir=inputs.out_dir)
    else:
        model, tokenizer = load_quantized(inputs, quantization)
        save_model(model, tokenizer, inputs.out_dir)  # before any forward pass: see the docstring
    layers = sum(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())
    if not layers:
        raise TechniqueError("bitsandbytes quantized no Linear layer of this model")
    facts = {
        "format": f"bitsandbytes {config.mode}"
        if config.serialization == "prequantized"
        else f"safetensors (dense), bitsandbytes {config.mode} applied at load",
        "library": f"bitsandbytes {version('bitsandbytes')}, transformers {version('transformers')}",
        "mode": config.mode,
        "bits": 8 if config.mode == "int8" else 4,
        "serialization": config.serialization,
        "quantized_layers": layers,
        "memory_bytes": memory_bytes(model),
    }
    if config.mode != "int8":
        facts |= {"double_quant": config.double_quant, "compute_dtype": config.compute_dtype or "float32"}
    return BuildResult(
        model_dir=inputs.out_dir,
        facts=facts,
        probe_logits=logits(model, probe_ids(inputs.calibration_ids)),
        load_kwargs={"quantization_config": quantization.to_dict()} if config.serialization == "load_time" else None,
    )


TECHNIQUE = Technique(
    name="bnb",
    summary="bitsandbytes int8 (LLM.int8()) or 4-bit NF4/FP4, quantized at load (no calibration)",
    config=BnbConfig,
    footprint=loads_model(extra_per_param=2, note="quantized at load beside the dense weights"),
    run=run,
    # bitsandbytes 0.50 has a CPU backend for all three modes (checked: build, save, reload, evaluate);
    # CUDA is its native backend.
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=False,
)
