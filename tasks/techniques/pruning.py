"""Shared by the pruning techniques (magnitude, wanda, sparsegpt, sparse24): layers, masks, save.

Not a technique itself. Every pruning technique prunes the decoder's Linear layers (never the
embeddings or lm_head: they are a lookup and the output distribution, both far more sensitive
than the projections), measures the zeros it produced, and saves a dense checkpoint.

Why dense: compressed-tensors 0.19 (the version llmcompressor 0.14 pins) dropped its sparse
storage formats ("Sparse compression is no longer supported"), so an unstructured- or 2:4-sparse
checkpoint is stored with its zeros, as large as the dense model. The saving on disk and in
memory comes from quantizing the pruned model in a later stage of a chain (zeros are kept there,
see weight_quant.preserve_zeros); a 2:4 speedup needs a runtime with sparse kernels (e.g. vLLM
on NVIDIA Ampere or later), which plain transformers is not.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from byoai.tasks.techniques import BuildInputs, BuildResult, TechniqueError
from byoai.tasks.techniques.weight_quant import _ignored

DENSE_FORMAT = "safetensors (dense: pruned zeros are stored, no size saving on disk)"


class PruningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fraction of each pruned layer's weights set to zero. 0.5 is where the one-shot methods
    # (SparseGPT, Wanda) still hold quality on 7B+ models; small models degrade faster.
    sparsity: float = Field(default=0.5, gt=0, lt=1)
    # Decoder Linear layers kept dense: exact module names or "re:<regex>" (llmcompressor's
    # syntax). Embeddings and lm_head are never pruned.
    ignore: tuple[str, ...] = ()


def prunable_layers(model, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The decoder's Linear layers that will be pruned, by module name."""
    import torch

    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head") and not _ignored(name, ignore)
    }
    if not layers:
        raise TechniqueError("params.ignore excludes every decoder Linear layer: nothing left to prune")
    return layers


def zero_fraction(layers: dict[str, Any]) -> float:
    """Exact zeros over all weights of these layers (what the technique produced, measured)."""
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zeros / sum(m.weight.numel() for m in layers.values())


def check_n_m_fits(layers: dict[str, Any], m: int) -> None:
    """N:M groups run along each row (input features); every pruned width must be a multiple of M."""
    for name, module in layers.items():
        if module.in_features % m:
            raise TechniqueError(
                f"layer '{name}' has {module.in_features} input features, not a multiple of {m}: "
                f"it cannot carry a {m}-wide N:M mask. Keep it dense with params.ignore: ['{name}']."
            )


def follows_n_m(weight, n: int = 2, m: int = 4) -> bool:
    """True when every group of `m` consecutive weights along a row has at least `n` zeros.

    This is the layout NVIDIA's sparse tensor cores accelerate (2:4, along the input dimension).
    """
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) == 0).sum(dim=1) >= n).all())


def n_m_keep_mask(scores, n: int = 2, m: int = 4):
    """Boolean keep-mask that drops the `n` lowest-scoring weights of every `m` consecutive in a row."""
    import torch

    groups = scores.reshape(-1, m)
    drop = torch.topk(groups, n, dim=1, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, drop, False)
    return keep.reshape(scores.shape)


def pruning_facts(layers: dict[str, Any], requested: float, mask: str, library: str) -> dict[str, Any]:
    """Facts common to every pruned artifact; the build step adds the sparsity of the reload."""
    facts = {
        "format": DENSE_FORMAT,
        "library": library,
        "mask": mask,
        "sparsity_requested": requested,
        # measured on the in-memory result, over the pruned layers only
        "pruned_sparsity": round(zero_fraction(layers), 6),
        "pruned_layers": len(layers),
    }
    if mask == "2:4":
        facts["follows_2_4"] = all(follows_n_m(module.weight) for module in layers.values())
    return facts


def prune_with_llmcompressor(
    inputs: BuildInputs, modifier_factory, ignore: tuple[str, ...], requested: float, mask: str
) -> BuildResult:
    """Load, run llmcompressor's oneshot with one pruning modifier on the calibration windows, save.

    The modifier gets the exact layer names as targets, so `ignore` means the same thing here as
    in magnitude pruning and the measured facts cover exactly the layers that were pruned.
    """
    from byoai.tasks.techniques.io import load_stage_input, own_weights, saved
    from byoai.tasks.techniques.weight_quant import run_oneshot

    model, tokenizer = load_stage_input(inputs.model_dir)
    own_weights(model)
    layers = prunable_layers(model, ignore)
    if mask == "2:4":
        check_n_m_fits(layers, 4)
    modifier = modifier_factory(targets=list(layers), ignore=[])
    run_oneshot(model, [modifier], inputs.calibration_ids)
    # llmcompressor's save wrapper: with no quantization attached it writes plain dense weights
    return saved(model, tokenizer, inputs,
        facts=pruning_facts(layers, requested, mask, f"llmcompressor {version('llmcompressor')}"),
    )
