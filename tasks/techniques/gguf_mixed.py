"""GGUF with a quantization type per tensor, chosen for the least predicted loss under a size budget.

1. Sensitivity: the KL divergence of the model's next-token distribution from the unquantized
   one (per token) when only that tensor is rounded to a candidate type with llama.cpp's
   own rounding (ggml's quantizer in the build that writes the file, as `llama-quantize` without
   an imatrix), on the recipe's calibration windows. `measure: fisher` (default) predicts it to
   second order, 1/2 sum F (w - q(w))^2, with the diagonal Fisher information F estimated from
   gradients of the log-likelihood of tokens sampled from the model itself (the Hessian of that
   KL at the unquantized weights): one backward pass per window for all tensors and types.
   `measure: kl` runs the model once per tensor x type instead (exact, for small models).
2. Choice: the types that minimize the summed KL within `max_size_mb` (the file) or
   `bits_per_weight` (over the quantized tensors): a multiple-choice knapsack, solved exactly by
   dynamic programming over the budget in 4,000 steps, each type's size rounded up (never over).
3. The file: llama.cpp's own converter and `llama-quantize --tensor-type-file` (tasks.techniques.gguf).

The sensitivity table is cached per model content and windows (beside the variants), so budgets
and candidate lists are tried for the cost of the knapsack. The table, the chosen types and a plot are kept in the artifact's `report/` folder
(logged to the variant's MLflow run, not shipped with the model).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from byoai.progress import advance
from byoai.tasks.techniques import REPORT_DIR, BuildInputs, BuildResult, Technique, TechniqueError

# the types in blocks of 32 along a row (k-quants' blocks of 256 do not divide every row: SmolLM2's are 576)
MixedType = Literal["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
_BUDGET_STEPS = 4000


class GgufMixedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: tuple[MixedType, ...] = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
    # the budget: one of the two
    max_size_mb: float | None = Field(default=None, gt=0)
    bits_per_weight: float | None = Field(default=None, gt=0, le=16)
    # how sensitivity is measured (see above), on this many calibration windows
    measure: Literal["fisher", "kl"] = "fisher"
    windows: int = Field(default=8, ge=1)
    imatrix: bool = False
    version: str = Field(default="0.3.36", pattern=r"^\d+\.\d+\.\d+$")

    @model_validator(mode="after")
    def _one_budget(self) -> GgufMixedConfig:
        if (self.max_size_mb is None) == (self.bits_per_weight is None):
            raise ValueError("give one budget: max_size_mb (the GGUF file) or bits_per_weight (over the quantized tensors)")
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates: give one or more distinct types")
        return self


def quant_bytes(n_elements: int, quant_type: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[quant_type.upper()]]
    return n_elements // block * size


def llama_cpp_roundtrip(weight, quant_type: str, build):
    """The weight as llama.cpp stores it in `quant_type`: quantized and dequantized by the build's ggml."""
    import torch

    from byoai.tasks.runtimes.llama_cpp import ggml_roundtrip

    return torch.from_numpy(ggml_roundtrip(build, weight.detach().float().cpu().numpy(), quant_type)).to(weight.dtype)


def quantizable(model) -> dict[str, object]:
    """GGUF tensor name -> the torch parameter it is written from: every 2-D weight llama-quantize
    quantizes (Linear weights and the token embedding; a tied output is the embedding)."""
    import torch
    from gguf import MODEL_ARCH, get_tensor_name_map

    archs = {"llama": MODEL_ARCH.LLAMA, "mistral": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2, "qwen3": MODEL_ARCH.QWEN3}
    arch = archs.get(model.config.model_type)
    if arch is None:
        raise TechniqueError(f"gguf_mixed maps tensors of {', '.join(sorted(archs))} models to GGUF names; this one is {model.config.model_type}")
    names = get_tensor_name_map(arch, model.config.num_hidden_layers)
    found: dict[str, object] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding) and id(module.weight) not in seen:
            gguf_name = names.get_name(module_name)
            if gguf_name is None:
                raise TechniqueError(f"gguf_mixed does not know the GGUF name of {module_name} ({type(model).__name__})")
            seen.add(id(module.weight))
            found[f"{gguf_name}.weight"] = module.weight
    return found


def fisher_sensitivity(model, windows, tensors: dict[str, object], candidates: tuple[str, ...], build) -> dict[str, dict[str, float]]:
    """Predicted KL per token for every tensor x type: 1/2 sum F (w - q(w))^2, F the diagonal
    Fisher information per token (squared gradients of the log-likelihood of sampled tokens)."""
    import torch

    names = list(tensors)
    fisher = {name: torch.zeros_like(tensors[name], dtype=torch.float32) for name in names}
    generator = torch.Generator().manual_seed(0)
    for i, row in enumerate(windows):
        advance(i, len(windows), "windows")
        logits = model(row[None]).logits.float()
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits[0], -1), 1, generator=generator)[:, 0]
        loglik = torch.log_softmax(logits[0], -1).gather(-1, sampled[:, None]).sum()
        for name, grad in zip(names, torch.autograd.grad(loglik, [tensors[n] for n in names])):
            fisher[name] += grad.float() ** 2
    advance(len(windows), len(windows), "windows")
    tokens = windows.shape[0] * windows.shape[1]
    table: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name in names:
            weight = tensors[name].detach().float()
            if weight.shape[-1] % 32:
                raise TechniqueError(f"gguf_mixed: {name} has rows of {weight.shape[-1]}, not a multiple of 32 (the candidates' block)")
            table[name] = {t: 0.5 * (fisher[name] * (llama_cpp_roundtrip(weight, t, build) - weight) ** 2).sum().item() / tokens for t in candidates}
    return table


def sensitivity(model, windows, tensors: dict[str, object], candidates: tuple[str, ...], build) -> dict[str, dict[str, float]]:
    """KL(unquantized || one tensor quantized) per token, measured, for every tensor x candidate type."""
    import torch

    with torch.inference_mode():
        base = torch.log_softmax(model(windows).logits.float(), dim=-1)
        base_p = base.exp()
        table: dict[str, dict[str, float]] = {}
        for i, (name, weight) in enumerate(tensors.items()):
            advance(i, len(tensors), "tensors")
            if weight.shape[-1] % 32:
                raise TechniqueError(f"gguf_mixed: {name} has rows of {weight.shape[-1]}, not a multiple of 32 (the candidates' block)")
            original = weight.data.clone()
            table[name] = {}
            for quant_type in candidates:
                weight.data.copy_(llama_cpp_roundtrip(original, quant_type, build))
                logq = torch.log_softmax(model(windows).logits.float(), dim=-1)
                table[name][quant_type] = max(0.0, (base_p * (base - logq)).sum(-1).mean().item())
            weight.data.copy_(original)
    return table


def cached_sensitivity(model, inputs: BuildInputs, tensors: dict[str, object], config: GgufMixedConfig) -> dict[str, dict[str, float]]:
    """The sensitivity table, measured once per (model content, windows) and type: variants with
    other budgets or candidate lists reuse it (it is most of this technique's cost)."""
    from byoai.files import folder_sha256, json_sha256
    from byoai.settings import Settings
    from byoai.tasks.runtimes.llama_cpp import LlamaCppConfig, build

    windows = inputs.calibration_ids[: config.windows]
    key = json_sha256({"model": folder_sha256(inputs.model_dir), "windows": windows.tolist(), "measure": f"{config.measure}-v1"})
    cache = inputs.out_dir.parent / "gguf_mixed-sensitivity" / f"{key[:24]}.json"
    table: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = tuple(t for t in config.candidates if any(t not in table.get(name, {}) for name in tensors))
    if missing:
        measure = fisher_sensitivity if config.measure == "fisher" else sensitivity
        tools = build(LlamaCppConfig(version=config.version), Settings().cache_dir.expanduser().resolve())  # this worker's native build
        for name, row in measure(model, windows, tensors, missing, tools).items():
            table.setdefault(name, {}).update(row)
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(table))
        partial.replace(cache)
    return {name: {t: table[name][t] for t in config.candidates} for name in tensors}


def choose(costs: list[list[tuple[int, float]]], budget: int) -> list[int] | None:
    """Per item, the option (bytes, loss) minimizing the summed loss with summed bytes <= budget;
    None when even the cheapest options exceed it."""
    import numpy as np

    cheapest = [min(range(len(c)), key=lambda i: (c[i][0], c[i][1])) for c in costs]
    floor = sum(c[i][0] for c, i in zip(costs, cheapest))
    if floor > budget:
        return None
    unit = max(1, math.ceil((budget - floor) / _BUDGET_STEPS))
    steps = (budget - floor) // unit
    best = np.zeros(steps + 1)  # least loss using at most s steps of extra bytes
    picks = []
    for c, low in zip(costs, cheapest):
        options = [(math.ceil((size - c[low][0]) / unit), loss) for size, loss in c]
        new = np.full(steps + 1, np.inf)
        pick = np.zeros(steps + 1, dtype=np.int16)
        for i, (extra, loss) in enumerate(options):
            if extra > steps:
                continue
            shifted = np.full(steps + 1, np.inf)
            shifted[extra:] = best[: steps + 1 - extra] + loss
            better = shifted < new
            new[better], pick[better] = shifted[better], i
        best = new
        picks.append((pick, options))
    chosen, s = [], steps
    for pick, options in reversed(picks):
        i = int(pick[s])
        chosen.append(i)
        s -= options[i][0]
    return chosen[::-1]


def write_report(folder: Path, table: dict[str, dict[str, float]], sizes: dict[str, int], chosen: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    types = list(next(iter(table.values())))
    lines = ["tensor,n_elements," + ",".join(f"kl_{t}" for t in types) + ",chosen"]
    lines += [f"{name},{sizes[name]}," + ",".join(f"{table[name][t]:.6g}" for t in types) + f",{chosen[name]}" for name in table]
    (folder / "sensitivity.csv").write_text("\n".join(lines) + "\n")
    (folder / "tensor_types.json").write_text(json.dumps(chosen, indent=1))
    fig, ax = plt.subplots(figsize=(max(8, len(table) * 0.08), 4.5))
    x = range(len(table))
    for t in types:
        ax.plot(x, [max(table[n][t], 1e-9) for n in table], ".", label=f"KL if {t}")
    ax.plot(x, [max(table[n][chosen[n]], 1e-9) for n in table], "k_", markersize=9, label="chosen")
    ax.set_yscale("log")
    ax.set_xlabel("tensor (GGUF order: " + ", ".join(list(table)[:2]) + ", ...)")
    ax.set_ylabel("KL per token, this tensor quantized alone")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "sensitivity.png", dpi=110)
    plt.close(fig)


def run(inputs: BuildInputs) -> BuildResult:
    from byoai.tasks.techniques.gguf import export_gguf
    from byoai.tasks.techniques.io import load_stage_input

    config: GgufMixedConfig = inputs.config
    model, _ = load_stage_input(inputs.model_dir)
    tensors = quantizable(model)
    table = cached_sensitivity(model, inputs, tensors, config)
    sizes = {name: int(weight.numel()) for name, weight in tensors.items()}
    del model

    def per_tensor(converted: Path, weight_bytes: int, work: Path):
        names = list(tensors)
        costs = [[(quant_bytes(sizes[n], t), table[n][t]) for t in config.candidates] for n in names]
        # metadata, vocabulary, norms: written as they are
        fixed = converted.stat().st_size - sum(weight_bytes * sizes[n] for n in names)
        if config.max_size_mb is not None:
            budget, field = int(config.max_size_mb * 1e6) - fixed, f"params.max_size_mb = {config.max_size_mb:g}"
        else:
            budget, field = int(config.bits_per_weight * sum(sizes.values()) / 8), f"params.bits_per_weight = {config.bits_per_weight:g}"
        picks = choose(costs, budget)
        if picks is None:
            smallest = min(config.candidates, key=lambda t: quant_bytes(32, t))
            least = sum(min(size for size, _ in c) for c in costs)
            raise TechniqueError(
                f"gguf_mixed: {field} is below the smallest file these candidates make "
                f"({(least + fixed) / 1e6:.1f} MB, {least * 8 / sum(sizes.values()):.2f} bits per weight, nearly all {smallest}); "
                "raise the budget or add a smaller type to params.candidates"
            )
        chosen = {n: config.candidates[i] for n, i in zip(names, picks)}
        type_file = work / "tensor_types.txt"
        type_file.write_text("".join(f"^{n.replace('.', chr(92) + '.')}$={t}\n" for n, t in chosen.items()))
        write_report(inputs.out_dir / REPORT_DIR, table, sizes, chosen)
        counts: dict[str, int] = {}
        for t in chosen.values():
            counts[t] = counts.get(t, 0) + 1
        uniform = {f"predicted_kl.uniform_{t}": round(sum(table[n][t] for n in names), 6) for t in config.candidates}
        return type_file, {
            "predicted_kl": round(sum(table[n][chosen[n]] for n in names), 6), **uniform,
            "chosen_types": json.dumps(dict(sorted(counts.items()))),
            "budget": field.removeprefix("params."), "sensitivity": config.measure,
            "sensitivity_windows": int(min(config.windows, inputs.calibration_ids.shape[0])),
            "candidates": ",".join(config.candidates),
        }

    # the base type only names the file's ftype: every quantized tensor is overridden
    facts = export_gguf(inputs, min(config.candidates, key=lambda t: quant_bytes(32, t)), config.imatrix, config.version, per_tensor)
    facts["quant_type"] = "mixed"
    return BuildResult(model_dir=inputs.out_dir, facts=facts, format="gguf")


def mixed_footprint(config: GgufMixedConfig, ctx):
    """Sensitivity holds the whole model with a gradient per weight and a float32 Fisher
    accumulator (or, for `measure: kl`, one forward at a time); then the GGUF export. Computed
    for the whole model at once, not layer by layer: the plan skips it where that does not fit."""
    from byoai.memory import PROCESS_BYTES, Footprint, forward_bytes, gguf_export_footprint

    shape = ctx.shape
    tokens = ctx.windows.calibration_seq_len
    if config.measure == "fisher":
        backward = tokens * shape.layers * (12 * shape.hidden + 4 * shape.intermediate) * shape.dtype_bytes
        host = PROCESS_BYTES + shape.params * (2 * shape.dtype_bytes + 4) + backward + forward_bytes(ctx, tokens)
        why = f"Fisher sensitivity: {shape.params / 1e9:.1f} B weights with their gradients ({shape.dtype}) and float32 Fisher accumulators"
    else:
        host = PROCESS_BYTES + 2 * shape.bytes_in(shape.dtype) + forward_bytes(ctx, tokens)
        why = "measured KL: the model and one tensor rounded at a time"
    export = gguf_export_footprint("mixed", config.imatrix, ctx)
    budget = int(config.max_size_mb * 1e6) if config.max_size_mb else int(shape.params * config.bits_per_weight / 8)
    return Footprint(host=max(host, export.host), why=why if host >= export.host else export.why, artifact=budget)


TECHNIQUE = Technique(
    name="gguf_mixed",
    summary="GGUF with a llama.cpp type per tensor, chosen by sensitivity (Fisher-predicted or measured KL) under a size or bits budget",
    config=GgufMixedConfig,
    footprint=mixed_footprint,
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
    output_format="gguf",
)
