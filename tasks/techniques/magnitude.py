"""Unstructured magnitude pruning (no calibration): the floor Wanda and SparseGPT must beat.

Each decoder Linear layer loses its `sparsity` fraction of smallest-|w| weights, ranked within
the layer (torch.nn.utils.prune.l1_unstructured, then prune.remove to bake the mask into the
weight). llmcompressor's own MagnitudePruningModifier is not used: under `oneshot` in 0.14 its
masks are never applied and nothing is pruned (checked on this project's machine).
"""

from __future__ import annotations

from byoai.memory import loads_model
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique
from byoai.tasks.techniques.pruning import PruningConfig, prunable_layers, pruning_facts


class MagnitudeConfig(PruningConfig):
    pass


def run(inputs: BuildInputs) -> BuildResult:
    import torch
    from torch.nn.utils import prune

    from byoai.tasks.techniques.io import load_stage_input, saved

    config: MagnitudeConfig = inputs.config
    model, tokenizer = load_stage_input(inputs.model_dir)
    layers = prunable_layers(model, config.ignore)
    with torch.no_grad():
        for module in layers.values():
            prune.l1_unstructured(module, "weight", amount=config.sparsity)
            prune.remove(module, "weight")
    return saved(model, tokenizer, inputs,
        facts=pruning_facts(layers, config.sparsity, "unstructured", f"torch {torch.__version__} (nn.utils.prune)"),
    )


TECHNIQUE = Technique(
    name="magnitude",
    quantizes=False,
    summary="unstructured magnitude pruning per layer, no calibration (torch.nn.utils.prune)",
    config=MagnitudeConfig,
    footprint=loads_model(),
    run=run,
    # a dense checkpoint with zeros: builds and runs anywhere transformers does
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=False,
)
