"""AWQ, activation-aware 4-bit weight quantization (Lin et al. 2023), with one of two libraries.

AWQ scales the input channels that see large activations up before quantizing (and the preceding
op's output down by the same factor), searching the scale per layer on calibration data, so the
salient weights lose less to rounding. No weight is updated as in GPTQ.

- backend llmcompressor (default): AWQModifier + QuantizationModifier; saves compressed-tensors
  (vLLM's native format; a later stage of a chain can start from it).
- backend gptqmodel: GPTQModel's AWQ (scale and clipping search, as AutoAWQ did); saves the AWQ
  GEMM checkpoint format AutoAWQ wrote (`quant_method: awq`), which transformers loads through
  GPTQModel's kernels (on CPU its int4 ATen kernel).
"""

from __future__ import annotations

from contextlib import contextmanager
from importlib.metadata import version
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError, gptqmodel_backend
from byoai.tasks.techniques.weight_quant import WeightQuantConfig, quantizable_layers, run_oneshot, quantization_scheme, weight_quant_footprint

# GPTQModel's AWQ clipping search walks output channels in batches of 64 (or 256) and asserts
# that they divide the layer's output width.
GPTQMODEL_AWQ_OUT_MULTIPLE = 64


class AwqConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Which library runs AWQ (see the module docstring); both run on CPU and CUDA.
    backend: Literal["llmcompressor", "gptqmodel"] = "llmcompressor"
    # AWQ is a 4-bit method: its checkpoint format and kernels are int4.
    bits: Literal[4] = 4
    # Columns per quantization group; must divide every quantized layer's input width
    # (SmolLM2's 576: 64 or 32, not 128). backend gptqmodel: 32, 64 or 128; -1 (one group per
    # output channel): llmcompressor only.
    group_size: int = Field(default=128, ge=-1)
    # Asymmetric groups with a zero point (AWQ's default and AutoAWQ's format); False: symmetric.
    zero_point: bool = True
    # Layers kept in full precision: exact module names, or "re:<regex>" (llmcompressor's syntax).
    ignore: tuple[str, ...] = ("lm_head",)
    # llmcompressor only. Grid points of the per-layer scale search: AWQ's cost is about
    # proportional (the paper's 20; fewer is faster and coarser).
    n_grid: int = Field(default=20, ge=2)
    # llmcompressor only. Scales from activations and weights (True, the paper's choice),
    # activations only (False), or search both halves of the grid ("both").
    duo_scaling: bool | Literal["both"] = True

    def weight_quant(self) -> WeightQuantConfig:
        """The same quantization as the shared weight-only config (layer checks, scheme)."""
        return WeightQuantConfig(bits=self.bits, group_size=self.group_size, symmetric=not self.zero_point, ignore=self.ignore)


@contextmanager
def _no_pinning_without_cuda():
    """Skip llmcompressor's pinning of cached activations when CUDA is absent.

    AWQModifier pins its cached layer inputs (IntermediatesCache.pin_memory) only to speed up
    host-to-GPU copies during its grid search; on CPU-only torch pin_memory() raises instead
    (llmcompressor 0.14). Pinning changes no value, so on a machine without CUDA the method is a
    no-op for the duration of the build and restored afterwards; with CUDA nothing is touched.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _run_llmcompressor(inputs: BuildInputs) -> BuildResult:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from byoai.tasks.techniques.io import load_stage_input, own_weights, saved

    config: AwqConfig = inputs.config
    scheme = config.weight_quant()
    model, tokenizer = load_stage_input(inputs.model_dir)
    own_weights(model)
    layers = quantizable_layers(model, scheme)
    # AWQModifier only rescales (smooth layer <- balance layers, mappings from the architecture);
    # the QuantizationModifier after it quantizes with the scheme it was searched for.
    recipe = [
        AWQModifier(n_grid=config.n_grid, duo_scaling=config.duo_scaling),
        QuantizationModifier(config_groups=quantization_scheme(scheme), ignore=list(scheme.ignore)),
    ]
    with _no_pinning_without_cuda():
        run_oneshot(model, recipe, inputs.calibration_ids)
    return saved(model, tokenizer, inputs, save_compressed=True, probe_first=True,
        facts={
            "format": "compressed-tensors",
            "backend": "llmcompressor",
            "library": f"llmcompressor {version('llmcompressor')}",
            "bits": config.bits,
            "group_size": config.group_size,
            "zero_point": config.zero_point,
            "quantized_layers": len(layers),
            "ignored": list(config.ignore),
        },
    )


def _check_gptqmodel_layers(model, layers: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in layers:
        width = modules[name].out_features
        if width % GPTQMODEL_AWQ_OUT_MULTIPLE:
            raise TechniqueError(
                f"backend gptqmodel's AWQ needs every quantized layer's output width to be a multiple "
                f"of {GPTQMODEL_AWQ_OUT_MULTIPLE} (its clipping search); layer '{name}' has {width}. "
                "Use backend: llmcompressor for this model."
            )


def _run_gptqmodel(inputs: BuildInputs) -> BuildResult:
    import torch
    from gptqmodel import BACKEND
    from gptqmodel.quantization.config import FORMAT, AWQConfig

    from byoai.tasks.techniques.io import load_stage_input

    config: AwqConfig = inputs.config
    defaults = AwqConfig()
    if (config.n_grid, config.duo_scaling) != (defaults.n_grid, defaults.duo_scaling):
        raise TechniqueError(
            "params.n_grid and params.duo_scaling tune llmcompressor's AWQ; GPTQModel's AWQ has its "
            "own fixed search. Remove them or use backend: llmcompressor"
        )
    gptqmodel_backend.require_only_lm_head_ignored(config.ignore)
    model, tokenizer = load_stage_input(inputs.model_dir)
    layers = quantizable_layers(model, config.weight_quant())  # names the layer a group size does not fit
    gptqmodel_backend.require_supported_group_size(config.group_size)
    _check_gptqmodel_layers(model, layers)
    quantize_config = AWQConfig(
        bits=config.bits,
        group_size=config.group_size,
        sym=not config.zero_point,
        format=FORMAT.GEMM,  # the AutoAWQ GEMM layout transformers loads
        offload_to_disk=gptqmodel_backend.offload_to_disk("auto", inputs),
    )
    if inputs.device == "cuda":
        # GPTQModel picks its fast CUDA AWQ kernel; AWQ kernels compute in float16.
        dtype, kernel = torch.float16, None
    else:
        # The default pick is a CUDA kernel ("AWQ: CUDA is not available"); the torch kernel runs
        # on CPU but only in fp16/bf16 ("only supports [float16, bfloat16]"), so calibrate in
        # bfloat16: float32's exponent range, and what the CPU int4 kernel that runs the
        # checkpoint computes in. Embeddings, lm_head and norms are therefore saved in bfloat16
        # (facts: unquantized_dtype), which also makes the reload check exact.
        dtype, kernel = torch.bfloat16, BACKEND.AWQ_TORCH
    with gptqmodel_backend.plain_input(inputs, model, tokenizer) as source:
        del model  # GPTQModel loads its own copy
        facts = gptqmodel_backend.build(inputs, source, tokenizer, quantize_config, dtype=dtype, kernel=kernel)
    return gptqmodel_backend.finish(
        inputs, facts, format=f"awq-{facts['checkpoint_format']}", quantized_layers=len(layers), ignored=list(config.ignore)
    )


def run(inputs: BuildInputs) -> BuildResult:
    if inputs.config.backend == "gptqmodel":
        return _run_gptqmodel(inputs)
    return _run_llmcompressor(inputs)


TECHNIQUE = Technique(
    name="awq",
    summary="AWQ activation-aware 4-bit weight quantization with calibration (llmcompressor or GPTQModel)",
    config=AwqConfig,
    footprint=weight_quant_footprint(calibrated=True),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
)
