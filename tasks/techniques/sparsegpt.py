"""SparseGPT (Frantar & Alistarh 2023): prune and update the remaining weights from the Hessian.

llmcompressor's SparseGPTModifier on the recipe's calibration windows, layer by layer: the
second-order update of the kept weights is what lets it beat Wanda and magnitude at equal
sparsity. Unstructured (mask chosen per block of columns, adaptively across rows).
"""

from __future__ import annotations

from functools import partial

from pydantic import Field

from byoai.memory import calibrates_layerwise
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique
from byoai.tasks.techniques.pruning import PruningConfig, prune_with_llmcompressor


class SparseGptConfig(PruningConfig):
    # Fraction of the Hessian's mean diagonal added before inversion: numerical stability with
    # few calibration tokens (llmcompressor's default).
    dampening_frac: float = Field(default=0.01, gt=0, lt=1)
    # Columns pruned and compensated together; the mask is chosen per block.
    block_size: int = Field(default=128, gt=0)


def sparsegpt_factory(config, mask_structure: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return partial(
        SparseGPTModifier,
        sparsity=0.5 if mask_structure == "2:4" else config.sparsity,
        mask_structure=mask_structure,
        dampening_frac=config.dampening_frac,
        block_size=config.block_size,
    )


def run(inputs: BuildInputs) -> BuildResult:
    config: SparseGptConfig = inputs.config
    factory = sparsegpt_factory(config, "0:0")
    return prune_with_llmcompressor(inputs, factory, config.ignore, config.sparsity, "unstructured")


TECHNIQUE = Technique(
    name="sparsegpt",
    quantizes=False,
    summary="SparseGPT unstructured pruning with calibration and weight update (llmcompressor)",
    config=SparseGptConfig,
    footprint=calibrates_layerwise("SparseGPT layer by layer", hessians=True),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
)
