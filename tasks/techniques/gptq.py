"""GPTQ weight-only quantization (Frantar et al. 2022) with llmcompressor's GPTQModifier."""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field

from tasks.techniques import BuildInputs, BuildResult, Technique
from tasks.techniques.weight_quant import WeightQuantConfig, quantize_with_llmcompressor


class GptqConfig(WeightQuantConfig):
    # Fraction of the Hessian's mean diagonal added for numerical stability.
    dampening_frac: float = Field(default=0.01, gt=0, lt=1)
    block_size: int = Field(default=128, gt=0)
    # Activation ordering (quantize high-activation columns first): "static" reorders columns
    # once (llmcompressor's default, no inference cost); "group" also reorders group indices.
    actorder: Literal["static", "group", "none"] = "static"


def run(inputs: BuildInputs) -> BuildResult:
    from llmcompressor.modifiers.quantization import GPTQModifier

    config: GptqConfig = inputs.config
    factory = partial(
        GPTQModifier,
        dampening_frac=config.dampening_frac,
        block_size=config.block_size,
        actorder=None if config.actorder == "none" else config.actorder,
    )
    return quantize_with_llmcompressor(inputs, factory, calibrate=True)


TECHNIQUE = Technique(
    name="gptq",
    summary="GPTQ weight-only quantization with calibration (llmcompressor)",
    config=GptqConfig,
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
)
