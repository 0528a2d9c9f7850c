"""Shared by the llmcompressor weight-only quantizers (RTN, GPTQ): config, layer checks, save.

Not a technique itself; rtn.py and gptq.py each add their own modifier.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from byoai.tasks.techniques import BuildInputs, BuildResult, TechniqueError


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


def run_oneshot(model, recipe: list, calibration_ids=None) -> None:
    """llmcompressor's oneshot on the calibration windows (none: data-free), counting the
    sequential pipeline's layers as it goes (byoai.progress: `building 12/30 layers` in the console)."""
    from llmcompressor import oneshot
    from llmcompressor.core import LifecycleCallbacks

    from byoai.progress import counting_calls

    kwargs = {} if calibration_ids is None else dict(
        dataset=calibration_dataset(calibration_ids),
        max_seq_length=calibration_ids.shape[1],
        num_calibration_samples=calibration_ids.shape[0],
    )
    with counting_calls(LifecycleCallbacks, "sequential_epoch_end", model.config.num_hidden_layers, "layers"):
        oneshot(model=model, recipe=recipe, **kwargs)


# A layer with at least this fraction of exact zeros in its input weights is treated as pruned.
# Trained dense float weights have practically none; pruned layers have 30-90 %.
PRUNED_LAYER_MIN_ZEROS = 0.1


@contextmanager
def keep_pruned_zeros(model, layers: list[str]):
    """Quantize a pruned input without losing its zeros; yields a dict of facts filled on exit.

    llmcompressor 0.14's GPTQ has no sparsity-aware mode: its error compensation moves pruned
    weights off zero (a 2:4 input comes out 46 % zero, and not 2:4). Inside this context GPTQ
    quantizes pruned weights to exactly 0 and compensates that error like any other (the joint
    sparsify + quantize step of SparseGPT, Frantar & Alistarh 2023; see _sparse_gptq).
    On exit every recorded zero is restored as a safety net (a quantizer that moved one anyway:
    counted in "zeros_restored", 0 for RTN and for sparsity-aware GPTQ). Zero is on every int
    grid (symmetric: q = 0; asymmetric: q = zero point), so the saved integers decode to zeros.

    On SmolLM2-135M (W4 g64, 16 x 256 calibration tokens), 2:4 SparseGPT -> GPTQ: perplexity
    42.8 this way, 50.1 re-zeroing after plain GPTQ, 51.9 with pre-0.14 llmcompressor's way
    (pruned weights take no compensation); plain GPTQ reaches 38.7 but leaves 46.9 %, not 2:4.
    """
    import torch
    from compressed_tensors.utils import align_module_device, update_offload_parameter

    modules = dict(model.named_modules())
    masks = {}
    for name in layers:
        zeros = modules[name].weight == 0
        if zeros.float().mean() >= PRUNED_LAYER_MIN_ZEROS:
            masks[name] = zeros.cpu()
    facts = {"sparse_layers_preserved": len(masks), "zeros_restored": 0}
    with _sparse_gptq(enabled=bool(masks)):
        yield facts
    with torch.no_grad():
        for name, zeros in masks.items():
            module = modules[name]
            with align_module_device(module):
                weight = module.weight
                zeros_here = zeros.to(weight.device)
                facts["zeros_restored"] += int((weight[zeros_here] != 0).sum())
                update_offload_parameter(module, "weight", weight.masked_fill(zeros_here, 0))


@contextmanager
def _sparse_gptq(enabled: bool):
    """Make llmcompressor 0.14.0.1's GPTQ keep the zeros of pruned layers (while in the context).

    Two functions of llmcompressor.modifiers.gptq.gptq_quantize are swapped: the activation
    reordering (to record, after it, which working columns hold pruned zeros; layers of a batch
    below PRUNED_LAYER_MIN_ZEROS get no mask) and the per-block update, replaced by the library's
    own eager update plus one line: a pruned weight's quantized value is 0, so its error (the
    compensation it had received) flows on to the weights not yet quantized, as in SparseGPT.
    GPTQ on dense inputs is untouched (not enabled). On CUDA the eager update replaces the
    Triton kernel for this build only. llmcompressor is pinned exactly (pyproject), which these
    internals need; a version that renames them fails the build loudly here.
    """
    if not enabled:
        yield
        return
    from copy import copy

    from compressed_tensors.quantization import QuantizationStrategy, fake_quantize
    from llmcompressor.modifiers.gptq import gptq_quantize as gq

    original_ordering, original_update = gq.apply_activation_ordering, gq.gptq_block_update
    state = {}

    def ordering(weights, hessians, actorder):
        weights, hessians, perm = original_ordering(weights, hessians, actorder)
        zeros = weights == 0  # the input's zeros, in the working (possibly permuted) column order
        pruned = zeros.float().mean(dim=(1, 2)) >= PRUNED_LAYER_MIN_ZEROS
        state["keep"] = ~(zeros & pruned[:, None, None])
        return weights, hessians, perm

    def block_update(W1, Hinv1, Q1, Err1, losses1, *, scale, zero_point, global_scale, g_idx, quant_args, i1):
        # llmcompressor 0.14.0.1 gptq_quantize.gptq_block_update (eager), plus the `keep` line
        block_width = W1.shape[-1]
        keep = state["keep"][:, :, i1 : i1 + block_width]
        altered_qargs = copy(quant_args)
        altered_qargs.strategy = QuantizationStrategy.CHANNEL
        eff, zp = gq.column_scale_window(
            scale, zero_point, global_scale, g_idx, quant_args, num_rows=W1.shape[-2], i1=i1, i2=i1 + block_width
        )
        for i in range(block_width):
            w = W1[:, :, i]
            q = fake_quantize(
                w.transpose(0, 1),
                eff[:, :, i].transpose(0, 1),
                None if zp is None else zp[:, :, i].transpose(0, 1),
                altered_qargs,
            ).transpose(0, 1)
            q = q * keep[:, :, i]  # a pruned weight is "quantized" to 0; its error is compensated
            error = (w - q) / Hinv1[:, i, i][:, None]
            Q1[:, :, i] = q
            Err1[:, :, i] = error
            losses1[:, :, i] = error.square()
            W1[:, :, i:] -= error.unsqueeze(-1) * Hinv1[:, i, i:].unsqueeze(1)

    gq.apply_activation_ordering, gq.gptq_block_update = ordering, block_update
    try:
        yield
    finally:
        gq.apply_activation_ordering, gq.gptq_block_update = original_ordering, original_update


def quantize_with_llmcompressor(inputs: BuildInputs, modifier_factory, calibrate: bool, offload: str = "memory") -> BuildResult:
    """Load, check layers, run llmcompressor's oneshot with one modifier, save compressed."""
    from byoai.tasks.techniques.io import saved

    config: WeightQuantConfig = inputs.config
    with layerwise_input(inputs, offload) as (model, tokenizer, weights):
        layers = quantizable_layers(model, config)
        modifier = modifier_factory(config_groups=quantization_scheme(config), ignore=list(config.ignore))
        # a pruned input stays pruned (a sparse24 -> gptq chain keeps its 2:4 mask)
        with keep_pruned_zeros(model, layers) as sparsity_facts:
            run_oneshot(model, [modifier], inputs.calibration_ids if calibrate else None)
        return saved(model, tokenizer, inputs, save_compressed=True, probe_first=True,
            facts={
                "format": "compressed-tensors",
                "library": f"llmcompressor {version('llmcompressor')}",
                "quantized_layers": len(layers),
                "ignored": list(config.ignore),
                "weights": weights,
                **sparsity_facts,
            },
        )


@contextmanager
def layerwise_input(inputs: BuildInputs, offload: str):
    """The stage input for llm-compressor's sequential pipeline, and where its weights wait
    ("memory" or "disk", as `offload` decides: byoai.memory.offloads_to_disk).

    In memory, every parameter gets its own pages (own_weights). On disk, the checkpoint's modules
    are read when their layer runs and updated ones are written to a folder beside the output
    (not /tmp, which may be RAM), removed afterwards. Only a plain checkpoint can stay on disk:
    an earlier stage's compressed output is decoded in memory."""
    import tempfile

    from byoai.hostmem import available_bytes
    from byoai.memory import offloads_to_disk
    from byoai.tasks.techniques.io import checkpoint_bytes, is_plain_checkpoint, load_offloaded, load_stage_input, own_weights

    source = Path(inputs.model_dir)
    if offloads_to_disk(offload, checkpoint_bytes(source), available_bytes(), inputs.device):
        if is_plain_checkpoint(source):
            with tempfile.TemporaryDirectory(prefix=".offload-", dir=Path(inputs.out_dir).parent) as folder:
                model, tokenizer = load_offloaded(source, Path(folder))
                yield model, tokenizer, "disk"
                return
        if offload == "disk":
            raise TechniqueError(f"offload: disk needs a plain checkpoint as the stage's input, and {source} is compressed; "
                                 "use offload: memory (or auto) for a stage after a compressing one")
    model, tokenizer = load_stage_input(source)
    yield own_weights(model), tokenizer, "memory"


def weight_quant_footprint(calibrated: bool, hessians: bool = False, hessian_copies: int = 0, offloadable: bool = False):
    """rtn / gptq / awq: the model whole in its dtype, calibrated one layer at a time (GPTQ with
    that layer's Hessians and working copies), or, `offloadable` and when its config's `offload`
    puts the weights on disk, one layer of it at a time; the file holds `bits` per Linear weight
    plus a 16-bit scale per group."""
    from byoai.memory import calibrates_layerwise, loads_model, offloaded_layerwise, offloads_to_disk, quantized_size

    def artifact(config, shape):
        return quantized_size(shape, config.bits + 16 / (config.group_size if config.group_size > 0 else shape.hidden))

    if not calibrated:
        dense = loads_model(note="data-free")

        def footprint(config, ctx):
            from dataclasses import replace

            return replace(dense(config, ctx), artifact=artifact(config, ctx.shape))

        return footprint
    note = "calibrated one layer at a time (llm-compressor's sequential pipeline)"
    in_memory = calibrates_layerwise(note, hessians=hessians, artifact=artifact, hessian_copies=hessian_copies)
    if not offloadable:
        return in_memory
    on_disk = offloaded_layerwise(note, hessians=hessians, artifact=artifact, hessian_copies=hessian_copies)

    def footprint(config, ctx):
        return (on_disk if offloads_to_disk(config.offload, ctx.input_bytes, ctx.host_capacity, ctx.device) else in_memory)(config, ctx)

    return footprint
