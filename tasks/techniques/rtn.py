"""Round-to-nearest weight quantization (no calibration): the floor GPTQ must beat."""

from __future__ import annotations

from functools import partial

from byoai.tasks.techniques import BuildInputs, BuildResult, Technique
from byoai.tasks.techniques.weight_quant import WeightQuantConfig, quantize_with_llmcompressor, weight_quant_footprint


class RtnConfig(WeightQuantConfig):
    pass


def run(inputs: BuildInputs) -> BuildResult:
    from llmcompressor.modifiers.quantization import QuantizationModifier

    # Weight-only RTN needs no data: llmcompressor picks its data-free pipeline.
    return quantize_with_llmcompressor(inputs, partial(QuantizationModifier), calibrate=False)


TECHNIQUE = Technique(
    name="rtn",
    summary="round-to-nearest weight-only quantization (llmcompressor)",
    config=RtnConfig,
    footprint=weight_quant_footprint(calibrated=False),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=False,
)
