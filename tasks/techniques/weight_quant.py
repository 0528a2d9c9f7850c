"""Shared by the llmcompressor weight-only quantizers (RTN, GPTQ): config, layer checks, save.

Not a technique itself; rtn.py and gptq.py each add their own modifier.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.techniques import BuildInputs, BuildResult, TechniqueError, probe_ids


class WeightQuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[2, 3, 4, 8] = 4
    # Columns per quantization group; -1 quantizes each output channel as one group.
    group_size: int = Field(default=128, ge=-1)
    symmetric: bool = True
    # Layers kept in full precision: exact module names, or "re:<regex>" (llmcompressor's syntax).
    ignore: tuple[str, ...] = ("lm_head",)


def _ignored(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.match(p[3:], name) if p.startswith("re:") else name == p for p in patterns)


def quantizable_layers(model, config: WeightQuantConfig) -> list[str]:
    """Names of the Linear layers that will be quantized; refuses a group size that does not fit.

    llmcompressor would otherwise fail deep inside calibration (or pad silently, depending on
    version); a group size must divide every quantized layer's input width.
    """
    import torch

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or _ignored(name, config.ignore):
            continue
        if config.group_size > 0 and module.in_features % config.group_size:
            divisors = [g for g in (32, 64, 128, 256) if module.in_features % g == 0]
            raise TechniqueError(
                f"group_size {config.group_size} does not divide the input width "
                f"{module.in_features} of layer '{name}'. Use a group size that divides it "
                f"({', '.join(map(str, divisors)) or 'e.g. -1 for per-channel'}), or keep the layer "
                f"in full precision with params.ignore: ['{name}'] (or a 're:' pattern)."
            )
        names.append(name)
    if not names:
        raise TechniqueError("params.ignore excludes every Linear layer: nothing left to quantize")
    return names


def quantization_scheme(config: WeightQuantConfig) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=config.bits,
        type="int",
        symmetric=config.symmetric,
        strategy="group" if config.group_size > 0 else "channel",
        group_size=config.group_size if config.group_size > 0 else None,
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}


def calibration_dataset(calibration_ids):
    from datasets import Dataset

    rows = calibration_ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def oneshot_kwargs(calibration_ids) -> dict[str, Any]:
    return dict(
        dataset=calibration_dataset(calibration_ids),
        max_seq_length=calibration_ids.shape[1],
        num_calibration_samples=calibration_ids.shape[0],
    )


def quantize_with_llmcompressor(inputs: BuildInputs, modifier_factory, calibrate: bool) -> BuildResult:
    """Load, check layers, run llmcompressor's oneshot with one modifier, save compressed."""
    from llmcompressor import oneshot

    from tasks.techniques.io import load_stage_input, logits, save_model

    config: WeightQuantConfig = inputs.config
    model, tokenizer = load_stage_input(inputs.model_dir)
    layers = quantizable_layers(model, config)
    modifier = modifier_factory(config_groups=quantization_scheme(config), ignore=list(config.ignore))
    oneshot(model=model, recipe=[modifier], **(oneshot_kwargs(inputs.calibration_ids) if calibrate else {}))
    save_model(model, tokenizer, inputs.out_dir, save_compressed=True)
    return BuildResult(
        model_dir=inputs.out_dir,
        probe_logits=logits(model, probe_ids(inputs.calibration_ids)),
        facts={
            "format": "compressed-tensors",
            "library": f"llmcompressor {version('llmcompressor')}",
            "quantized_layers": len(layers),
            "ignored": list(config.ignore),
        },
    )
