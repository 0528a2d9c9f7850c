"""int8 quantization with torchao (transformers' TorchAoConfig), the 8-bit path that runs on CPU.

weight_only: int8 weights with one scale per output row (`Int8WeightOnlyConfig`); activations stay
in float and the weight is converted for each matmul. dynamic: activations are also quantized to
int8 per token at run time and the product is an int8 matmul (`Int8DynamicActivationInt8WeightConfig`,
SmoothQuant's W8A8 without the smoothing). Nothing is calibrated. torchao's tensors save to
safetensors (flattened, with metadata) and reload in transformers 5 as the same quantized tensors.
Its int4 paths need CUDA or extra CPU kernels: not offered here (see gptq/rtn for 4-bit on CPU).
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Literal

from pydantic import BaseModel, ConfigDict

from byoai.memory import loads_model
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError


class Int8CpuConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # weight_only: smallest change in quality (SmolLM2-135M: +0.5 % perplexity); the win is size.
    # dynamic: int8 x int8 matmuls, fast on CUDA (torch._int_mm); activations are quantized too
    # (+4 %). On CPU without torch.compile torchao runs them as int32 matmuls: slower than float.
    mode: Literal["weight_only", "dynamic"] = "weight_only"


def quantization_config(config: Int8CpuConfig):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    # Per-row (per output channel) scales, torchao's default for both: the int8 kernels need it.
    quant = Int8WeightOnlyConfig() if config.mode == "weight_only" else Int8DynamicActivationInt8WeightConfig()
    return TorchAoConfig(quant_type=quant)


def memory_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, a torchao tensor counted by its int8 data and scales.

    `get_memory_footprint` counts a torchao tensor at its float size, and torchao's
    `get_model_size_in_bytes` counts tied weights (embeddings = lm_head) twice.
    """
    import itertools

    def size(tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__"):
            return sum(size(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
        return tensor.numel() * tensor.element_size()

    return sum(size(t) for t in itertools.chain(model.parameters(), model.buffers()))


def run(inputs: BuildInputs) -> BuildResult:
    from torchao.quantization import Int8Tensor

    from byoai.tasks.techniques.bnb import load_quantized
    from byoai.tasks.techniques.io import saved

    config: Int8CpuConfig = inputs.config
    model, tokenizer = load_quantized(inputs, quantization_config(config))
    layers = sum(isinstance(getattr(m, "weight", None), Int8Tensor) for m in model.modules())
    if not layers:
        raise TechniqueError("torchao quantized no Linear layer of this model")
    return saved(model, tokenizer, inputs,
        facts={
            "format": "torchao int8 (safetensors)",
            "library": f"torchao {version('torchao')}, transformers {version('transformers')}",
            "mode": config.mode,
            "bits": 8,
            "quantized_layers": layers,
            "memory_bytes": memory_bytes(model),
        },
    )


TECHNIQUE = Technique(
    name="int8_cpu",
    summary="torchao int8 weight-only or dynamic int8 activations + weights (no calibration)",
    config=Int8CpuConfig,
    footprint=loads_model(extra_per_param=1, note="int8 copy of the Linear weights"),
    run=run,
    # Checked on CPU (build, safetensors save, reload, evaluate). torchao's Int8Tensor matmuls are
    # device-generic (torch._int_mm on CUDA), and CUDA is torchao's main platform.
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=False,
)
