"""Structured depth pruning: remove whole decoder layers that change the residual stream least.

Importance is measured on the recipe's calibration windows from each layer's input and output
hidden states (one forward pass of the unpruned model, hooks on the decoder layers):

- block_influence (ShortGPT, Men et al. 2024): BI_l = 1 - mean cos(h_in, h_out) of layer l, over
  all tokens; the `n_layers` layers with the lowest BI are dropped, wherever they are.
- angular (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"):
  d(l, n) = mean arccos(cos(h_l, h_{l+n})) / pi over all tokens, for every block of `n_layers`
  consecutive layers; the block with the smallest distance is dropped.

Unlike unstructured pruning this shrinks the checkpoint and speeds up every runtime (fewer layers
to run), at a larger quality cost per removed parameter; the papers heal it with a short
fine-tune, which a later stage of a chain (e.g. distillation) can do.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from byoai.memory import loads_model
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError


class DropLayersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Decoder layers to remove; at least one must stay.
    n_layers: int = Field(default=1, ge=1)
    score: Literal["block_influence", "angular"] = "block_influence"
    # Layers never dropped, by index (e.g. the first layer, which every paper finds essential).
    keep: tuple[int, ...] = ()


def _layer_list(model) -> tuple[object, str]:
    """(parent module, attribute) of the decoder's list of layers, wherever the architecture keeps
    it: the first ModuleList of config.num_hidden_layers blocks (Llama/Qwen/Mistral model.layers,
    GPT-NeoX gpt_neox.layers, GPT-2/Falcon transformer.h, OPT model.decoder.layers)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and n and len(module) == n and name:
            parent, _, attribute = name.rpartition(".")
            return model.get_submodule(parent), attribute
    raise TechniqueError(
        f"{type(model).__name__} ({model.config.model_type}) keeps no list of its {n} decoder layers that drop_layers "
        "can find: it supports decoder stacks held as one ModuleList (Llama/Qwen/Mistral model.layers, "
        "GPT-NeoX gpt_neox.layers, GPT-2/Falcon transformer.h, OPT model.decoder.layers)"
    )


def decoder_layers(model):
    parent, attribute = _layer_list(model)
    return getattr(parent, attribute)


def layer_hidden_states(model, calibration_ids):
    """Per calibration window: the hidden state entering each decoder layer and leaving the last.

    Yields a list of len(layers) + 1 tensors [seq, hidden] (float32): h_0 ... h_L.
    """
    import torch

    layers = decoder_layers(model)
    states: list[Any] = []

    def grab_input(_module, args, kwargs):
        states.append((args[0] if args else kwargs["hidden_states"])[0].float())

    def grab_output(_module, _args, output):
        states.append((output[0] if isinstance(output, tuple) else output)[0].float())

    hooks = [layer.register_forward_pre_hook(grab_input, with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(grab_output))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for row in calibration_ids:
                states.clear()
                model(row[None].to(device), use_cache=False)
                yield list(states)
    finally:
        for hook in hooks:
            hook.remove()


def importance(model, calibration_ids, score: str, n_layers: int) -> dict[int, float]:
    """Score per candidate (a layer index, or the first layer of an n-layer block): lower = drop."""
    import torch

    n = len(decoder_layers(model))
    span = 1 if score == "block_influence" else n_layers
    totals = torch.zeros(n - span + 1, dtype=torch.float64)
    tokens = 0
    for states in layer_hidden_states(model, calibration_ids):
        for start in range(n - span + 1):
            cos = torch.nn.functional.cosine_similarity(states[start], states[start + span], dim=-1).clamp(-1, 1)
            value = 1 - cos if score == "block_influence" else torch.arccos(cos) / math.pi
            totals[start] += value.double().sum()
        tokens += states[0].shape[0]
    return {start: float(total / tokens) for start, total in enumerate(totals)}


def choose(scores: dict[int, float], score: str, n_layers: int, keep: set[int]) -> list[int]:
    if score == "block_influence":
        candidates = sorted((s, i) for i, s in scores.items() if i not in keep)
        return sorted(i for _, i in candidates[:n_layers])
    blocks = [(s, start) for start, s in scores.items() if not keep & set(range(start, start + n_layers))]
    if not blocks:
        raise TechniqueError(f"params.keep leaves no block of {n_layers} consecutive layers to drop")
    return list(range(min(blocks)[1], min(blocks)[1] + n_layers))


def remove_layers(model, dropped: list[int]) -> None:
    """Delete the layers and renumber what transformers indexes by layer (KV cache, layer types)."""
    import torch

    parent, attribute = _layer_list(model)
    layers = getattr(parent, attribute)
    n = len(layers)
    kept = [i for i in range(n) if i not in set(dropped)]
    setattr(parent, attribute, torch.nn.ModuleList(layers[i] for i in kept))
    for new_index, layer in enumerate(getattr(parent, attribute)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # the KV cache slot of attention layers
                module.layer_idx = new_index
    config = model.config
    # per-layer lists in the config (layer_types for sliding/full attention, and the like)
    for key, value in list(vars(config).items()):
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)


def run(inputs: BuildInputs) -> BuildResult:
    from byoai.tasks.techniques.io import load_stage_input, saved

    config: DropLayersConfig = inputs.config
    model, tokenizer = load_stage_input(inputs.model_dir)
    model.to(inputs.device)  # the scoring pass is a plain forward: run it where the build runs
    n = len(decoder_layers(model))
    keep = set(config.keep)
    if bad := sorted(i for i in keep if not 0 <= i < n):
        raise TechniqueError(f"params.keep has layer indices {bad} outside 0..{n - 1}")
    if config.n_layers > n - len(keep) or config.n_layers >= n:
        raise TechniqueError(
            f"cannot drop {config.n_layers} of {n} layers keeping {len(keep)}: lower params.n_layers"
        )
    scores = importance(model, inputs.calibration_ids, config.score, config.n_layers)
    dropped = choose(scores, config.score, config.n_layers, keep)
    params_before = sum(p.numel() for p in model.parameters())
    remove_layers(model, dropped)
    return saved(model, tokenizer, inputs,
        facts={
            "format": "safetensors",
            "library": "transformers (layers removed from the module list)",
            "score": config.score,
            "dropped_layers": dropped,
            # the score of each candidate (layer, or first layer of a block): lower changed less
            "layer_scores": {str(i): round(s, 6) for i, s in scores.items()},
            "layers_before": n,
            "layers_after": n - len(dropped),
            "params_removed_fraction": round(1 - sum(p.numel() for p in model.parameters()) / params_before, 6),
        },
    )


TECHNIQUE = Technique(
    name="drop_layers",
    quantizes=False,
    summary="structured depth pruning: drop the decoder layers that change hidden states least",
    config=DropLayersConfig,
    footprint=loads_model(extra_per_param=0, note="hidden states of every layer per window"),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
)
