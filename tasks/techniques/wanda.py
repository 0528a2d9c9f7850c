"""Wanda (Sun et al. 2023): prune by |weight| x input-activation norm, with calibration, no update.

llmcompressor's WandaPruningModifier, run layer by layer (sequential pipeline) on the recipe's
calibration windows. Unstructured: within each output row, the lowest-scoring `sparsity`
fraction of weights is zeroed (the paper's per-output comparison group).
"""

from __future__ import annotations

from functools import partial

from byoai.memory import calibrates_layerwise
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique
from byoai.tasks.techniques.pruning import PruningConfig, prune_with_llmcompressor


class WandaConfig(PruningConfig):
    pass


def run(inputs: BuildInputs) -> BuildResult:
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    config: WandaConfig = inputs.config
    factory = partial(WandaPruningModifier, sparsity=config.sparsity, mask_structure="0:0")
    return prune_with_llmcompressor(inputs, factory, config.ignore, config.sparsity, "unstructured")


TECHNIQUE = Technique(
    name="wanda",
    quantizes=False,
    summary="Wanda unstructured pruning with calibration (llmcompressor)",
    config=WandaConfig,
    footprint=calibrates_layerwise("Wanda layer by layer"),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
)
