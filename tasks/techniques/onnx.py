"""ONNX export: onnxruntime-genai's model builder, for the `onnxruntime_genai` runtime.

The stage input is written as an ONNX model folder (model.onnx + model.onnx.data,
genai_config.json, the tokenizer) by the builder the runtime ships with
(`python -m onnxruntime_genai.models.builder`), never by a hand-written exporter:
- int4 / int8: weight-only MatMulNBits (blocks of `block_size`, symmetric or not, RTN or
  k_quant), with activations computed at `accuracy_level` (4: int8 on CPU, the fastest);
- fp32 (CPU), fp16 / bf16 (CUDA): the weights as they are.
The execution provider is the target's device. A GPTQ or AWQ checkpoint (the gptq / awq
techniques with `backend: gptqmodel`) is read as it is and keeps its quantized weights; the builder
cannot read llm-compressor's compressed-tensors, bitsandbytes or torchao folders, nor a GGUF.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from byoai.memory import loads_model
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError, error_line

# what the builder reads as it is: a dense folder, or these checkpoint formats (kept quantized)
READABLE = "a dense save_pretrained folder, or a GPTQ or AWQ checkpoint (techniques gptq / awq with backend: gptqmodel)"
_PRECISIONS = {"cpu": ("int4", "int8", "fp32"), "cuda": ("int4", "int8", "fp16", "bf16", "fp32")}


class OnnxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Literal["int4", "int8", "fp32", "fp16", "bf16"] = "int4"
    # int4 / int8 weight-only quantization (MatMulNBits)
    block_size: Literal[16, 32, 64, 128, 256] = 32
    symmetric: bool = True
    algo: Literal["rtn", "k_quant"] = "rtn"
    # MatMulNBits' compute type: 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (the builder's CPU default)
    accuracy_level: Literal[1, 2, 3, 4] | None = None
    # One matrix for the embedding and the LM head, when the model ties them (a smaller file).
    shared_embeddings: bool = True
    # MatMul groups kept in int8 inside an int4 model (the builder's matmul_mixed_precision):
    # last_matmul is the LM head, the largest and most output-sensitive weight; mixed_layers is
    # llama.cpp's mixed choice (first and last eighth of the layers, every third layer's qkv/v/down).
    int8_matmuls: tuple[Literal["last_matmul", "mixed_layers"], ...] = ()

    @model_validator(mode="after")
    def _int8_inside_int4(self) -> OnnxConfig:
        if self.int8_matmuls and self.precision != "int4":
            raise ValueError(f"int8_matmuls keeps MatMuls in int8 inside an int4 model; precision is {self.precision}: drop int8_matmuls or use precision: int4")
        return self


def input_format(model_dir: Path) -> str | None:
    """Why the builder cannot read this folder, or None."""
    if not (model_dir / "config.json").is_file():
        return f"{model_dir} is not a save_pretrained folder (a GGUF stage's output cannot be exported; put onnx after an hf stage)"
    if (model_dir / "byoai_load.json").is_file():
        return "this input is quantized at load time (bitsandbytes or torchao)"
    quantization = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method is not None and method not in {"gptq", "awq"}:
        return f"this input is a {method} checkpoint (llm-compressor writes compressed-tensors: use backend: gptqmodel)"
    return None


def extra_options(config: OnnxConfig, tied: bool) -> dict[str, str]:
    options: dict[str, str] = {}
    if config.precision in {"int4", "int8"}:
        options |= {"block_size": str(config.block_size), "is_symmetric": str(config.symmetric).lower(), "algo_config": config.algo}
        if config.accuracy_level is not None:
            options["accuracy_level"] = str(config.accuracy_level)
        if config.int8_matmuls:
            options["matmul_mixed_precision"] = ",".join(f"{group}:int8" for group in config.int8_matmuls)
    if config.shared_embeddings and tied:
        options["shared_embeddings"] = "true"
    options["hf_remote"] = "false"
    return options


def export(model_dir: Path, out_dir: Path, config: OnnxConfig, device: str) -> dict[str, str]:
    """Run the model builder in its own process; return the options it was given."""
    model_config = json.loads((model_dir / "config.json").read_text())
    options = extra_options(config, bool(model_config.get("tie_word_embeddings")))
    with tempfile.TemporaryDirectory(prefix="byoai-onnx-cache-", dir=out_dir.parent) as cache:
        done = subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
             "-p", config.precision, "-e", device, "-c", cache,
             "--extra_options", *(f"{k}={v}" for k, v in options.items())],
            capture_output=True, text=True,
        )
    if done.returncode != 0:
        raise TechniqueError(f"onnxruntime-genai's model builder cannot export this model: {error_line(done.stderr)}")
    return options


def onnx_facts(out_dir: Path) -> dict[str, object]:
    """What the file holds: its size and how many MatMuls run on quantized weights."""
    import onnx

    graph = onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph
    ops: dict[str, int] = {}
    int8_weights = 0
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type == "MatMulNBits":
            int8_weights += any(a.name == "bits" and a.i == 8 for a in node.attribute)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if ".onnx" in f.name)
    return {
        "onnx_mb": round(size / 1e6, 3),
        "matmul_nbits": ops.get("MatMulNBits", 0),
        "matmul_nbits_int8": int8_weights,  # of those, how many hold 8-bit weights
        "matmul": ops.get("MatMul", 0),  # float, or int8 when QuantizeLinear feeds it (static int8)
        "gather_block_quantized": ops.get("GatherBlockQuantized", 0),
        "quantize_linear": ops.get("QuantizeLinear", 0),  # static int8: activations quantized in the graph
    }


def run(inputs: BuildInputs) -> BuildResult:
    config: OnnxConfig = inputs.config
    if (reason := input_format(inputs.model_dir)) is not None:
        raise TechniqueError(f"onnx cannot export this input: {reason}. The model builder reads {READABLE}")
    if config.precision not in _PRECISIONS[inputs.device]:
        raise TechniqueError(
            f"onnx precision {config.precision} has no {inputs.device} kernels in ONNX Runtime; "
            f"use one of {', '.join(_PRECISIONS[inputs.device])} on a {inputs.device} target"
        )
    quantization = json.loads((inputs.model_dir / "config.json").read_text()).get("quantization_config")
    options = export(inputs.model_dir, inputs.out_dir, config, inputs.device)
    quant_type = config.precision
    if config.precision in {"int4", "int8"}:
        quant_type += f"-b{config.block_size}-{'sym' if config.symmetric else 'asym'}-{config.algo}"
        quant_type += "".join(f"-{group}-int8" for group in config.int8_matmuls)
    facts: dict[str, object] = {
        "format": "onnx", "precision": config.precision, "quant_type": quant_type, "execution_provider": inputs.device,
        "builder": f"onnxruntime-genai {metadata.version('onnxruntime-genai')} model builder",
        "builder_options": json.dumps(options, sort_keys=True),
    }
    if isinstance(quantization, dict):
        facts["kept_quantized_from"] = f"{quantization.get('quant_method')} {quantization.get('bits')}-bit checkpoint, read as it is"
    facts |= onnx_facts(inputs.out_dir)
    return BuildResult(model_dir=inputs.out_dir, facts=facts, format="onnx")


def onnx_footprint(config: OnnxConfig, ctx):
    """The model builder loads float32 weights (4 more bytes per parameter than bf16) and writes the
    graph; int4/int8 quantize every MatMul and, shared, the embeddings too (a 16-bit scale per block)."""
    from dataclasses import replace

    loaded = loads_model(extra_per_param=4, note="the model builder loads float32 weights and writes the ONNX graph")(config, ctx)
    bits = {"int4": 4 + 16 / config.block_size, "int8": 8 + 16 / config.block_size, "fp16": 16, "bf16": 16, "fp32": 32}[config.precision]
    return replace(loaded, artifact=int(ctx.shape.params * bits / 8))


TECHNIQUE = Technique(
    name="onnx",
    summary="ONNX export: onnxruntime-genai's model builder (int4/int8 MatMulNBits, fp32/fp16); reads GPTQ/AWQ checkpoints as they are",
    config=OnnxConfig,
    footprint=onnx_footprint,
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=False,
    output_format="onnx",
)
