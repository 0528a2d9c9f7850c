"""Quantization-aware distillation onto llama.cpp's grid: train so that `gguf` of the same type is lossless.

The stage input is distilled from the base model (tasks.techniques.distill: KL at a temperature
on the calibration windows) while every decoder Linear weight is seen through a fake quantizer
that rounds exactly as llama.cpp's reference quantizer does for `quant_type` (blocks of 32 along
each row; the fp16 block scales included), with straight-through gradients. The saved weights
are the rounded ones: they lie on that grid, so a following `gguf` stage of the same type
re-quantizes them without changing a value (`llama-quantize` without an imatrix; an imatrix
would move the scales). The LM head and embeddings stay in float: llama.cpp quantizes the output
tensor with its own, finer rule.

Intended use: stages [qat {quant_type: q4_0}, gguf {quant_type: q4_0}].
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from byoai.memory import trains_student
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError
from byoai.tasks.techniques.distill import DistillConfig, distill

QatType = Literal["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
BLOCK = 32


class QatConfig(DistillConfig):
    quant_type: QatType = "q4_0"
    steps: int = Field(default=100, ge=1)
    # Higher than distill's: only a weight that crosses a rounding boundary changes what is stored,
    # and Adam moves each weight by about the learning rate per step. On SmolLM2, 60 steps at 1e-4
    # reached +3.7 % ppl over fp32 in q4_0 where 40 at 3e-5 reached +4.6 % (bench/quality_per_byte.py).
    learning_rate: float = Field(default=1e-4, gt=0, lt=1)
    temperature: float = Field(default=1.0, gt=0)


def _fp16(x):
    import torch

    return x.to(torch.float16).to(torch.float32)


def grid(weight, quant_type: str):
    """`weight` rounded as llama.cpp's reference quantizer (ggml-quants.c, gguf-py's quants.py)
    stores and dequantizes it: same arithmetic in float32, scales through fp16."""
    import torch

    shape = weight.shape
    x = weight.float().reshape(-1, BLOCK)
    if quant_type in {"q4_0", "q5_0"}:  # signed scale from the value of largest magnitude
        half = 8.0 if quant_type == "q4_0" else 16.0
        top = 2 * half - 1
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))
        d = peak / -half
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(x * inv + (half + 0.5)).clamp(0, top)
        out = _fp16(d) * (q - half)
    elif quant_type in {"q4_1", "q5_1"}:  # scale and minimum
        top = 15.0 if quant_type == "q4_1" else 31.0
        low, high = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
        d = (high - low) / top
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc((x - low) * inv + 0.5).clamp(0, top)
        out = _fp16(d) * q + _fp16(low)
    elif quant_type == "q8_0":
        d = x.abs().max(-1, keepdim=True).values / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        scaled = x * inv
        q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # roundf: halves away from zero
        out = _fp16(d) * q
    else:
        raise TechniqueError(f"qat has no reference rounding for {quant_type}")
    return out.reshape(shape).to(weight.dtype)


def fake_quantizer(quant_type: str):
    """A parametrization: the weight as stored in `quant_type`, gradients passed straight through."""
    import torch

    class FakeQuant(torch.nn.Module):
        def forward(self, weight):
            # exactly the grid's values forward (weight - weight.detach() is 0), the identity backward
            return grid(weight.detach(), quant_type) + (weight - weight.detach())

    return FakeQuant()


def decoder_linears(model):
    import torch

    output = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output]


def run(inputs: BuildInputs) -> BuildResult:
    import torch
    from torch.nn.utils import parametrize

    from byoai.tasks.techniques.io import saved

    config: QatConfig = inputs.config

    def prepare(student):
        for linear in decoder_linears(student):
            if linear.weight.shape[-1] % BLOCK:
                raise TechniqueError(f"qat: a Linear has rows of {linear.weight.shape[-1]}, not a multiple of {BLOCK} ({config.quant_type} blocks)")
            parametrize.register_parametrization(linear, "weight", fake_quantizer(config.quant_type))

    student, tokenizer, facts = distill(inputs, config, prepare)
    with torch.no_grad():
        linears = decoder_linears(student)
        for linear in linears:  # the trained weights, rounded onto the grid for good
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
            linear.weight.copy_(grid(linear.weight, config.quant_type))
    # saved in float32 whatever the input's dtype: bfloat16 would move the weights off the grid
    facts |= {"quant_type": config.quant_type, "on_grid_tensors": len(linears), "grid": f"llama.cpp {config.quant_type} reference rounding", "saved_dtype": "float32"}
    return saved(student, tokenizer, inputs, facts=facts)


TECHNIQUE = Technique(
    name="qat",
    summary="quantization-aware distillation onto llama.cpp's q4_0/q4_1/q5_0/q5_1/q8_0 grid (then gguf of that type is lossless)",
    config=QatConfig,
    footprint=trains_student(extra_per_param=4),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
)
