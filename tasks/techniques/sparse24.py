"""2:4 semi-structured sparsity: in every 4 consecutive weights of a row, 2 are zero (50 % exactly).

The layout NVIDIA sparse tensor cores (Ampere and later) accelerate, e.g. through vLLM's 2:4
kernels. Plain transformers runs it as a dense model (same speed, same size): the benefit comes
from a sparse-kernel runtime, or from quantizing it in a later stage (the zeros are preserved).
The mask is chosen by one of three methods, best first:

- sparsegpt: llmcompressor's SparseGPTModifier with mask_structure "2:4" (calibration, weight update)
- wanda: llmcompressor's WandaPruningModifier with mask_structure "2:4" (calibration, no update)
- magnitude: keep the 2 largest |w| of every 4 (no calibration), applied with torch.nn.utils.prune
"""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from byoai.memory import calibrates_layerwise
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique
from byoai.tasks.techniques.pruning import check_n_m_fits, prunable_layers, prune_with_llmcompressor, pruning_facts


class Sparse24Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["sparsegpt", "wanda", "magnitude"] = "sparsegpt"
    # Decoder Linear layers kept dense: exact names or "re:<regex>". Needed for a layer whose
    # input width is not a multiple of 4. Embeddings and lm_head are never pruned.
    ignore: tuple[str, ...] = ()
    # SparseGPT only (see sparsegpt.py): Hessian dampening and columns compensated together.
    dampening_frac: float = Field(default=0.01, gt=0, lt=1)
    block_size: int = Field(default=128, gt=0)


def _magnitude_2_4(inputs: BuildInputs, config: Sparse24Config) -> BuildResult:
    import torch
    from torch.nn.utils import prune

    from byoai.tasks.techniques.io import load_stage_input, saved
    from byoai.tasks.techniques.pruning import n_m_keep_mask

    model, tokenizer = load_stage_input(inputs.model_dir)
    layers = prunable_layers(model, config.ignore)
    check_n_m_fits(layers, 4)
    with torch.no_grad():
        for module in layers.values():
            prune.custom_from_mask(module, "weight", n_m_keep_mask(module.weight.abs(), 2, 4))
            prune.remove(module, "weight")
    return saved(model, tokenizer, inputs,
        facts=pruning_facts(layers, 0.5, "2:4", f"torch {torch.__version__} (nn.utils.prune)"),
    )


def run(inputs: BuildInputs) -> BuildResult:
    config: Sparse24Config = inputs.config
    if config.method == "magnitude":
        result = _magnitude_2_4(inputs, config)
    elif config.method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        factory = partial(WandaPruningModifier, sparsity=0.5, mask_structure="2:4")
        result = prune_with_llmcompressor(inputs, factory, config.ignore, 0.5, "2:4")
    else:
        from byoai.tasks.techniques.sparsegpt import sparsegpt_factory

        result = prune_with_llmcompressor(inputs, sparsegpt_factory(config, "2:4"), config.ignore, 0.5, "2:4")
    if not result.facts["follows_2_4"]:  # a library change that broke the layout must not pass silently
        from byoai.tasks.techniques import TechniqueError

        raise TechniqueError(f"2:4 pruning with method {config.method} produced weights that are not 2:4")
    result.facts["method"] = config.method
    return result


TECHNIQUE = Technique(
    name="sparse24",
    quantizes=False,
    summary="2:4 semi-structured pruning (sparsegpt | wanda | magnitude mask)",
    config=Sparse24Config,
    footprint=calibrates_layerwise("2:4 SparseGPT layer by layer", hessians=True),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    # sparsegpt and wanda (the default) use the calibration windows; magnitude ignores them
    needs_calibration=True,
)
