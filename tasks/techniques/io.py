"""Loading and saving model folders the same way in every technique."""

from __future__ import annotations

import json
from pathlib import Path

LOAD_FILE = "byoai_load.json"


def write_load_kwargs(folder: Path, load_kwargs: dict) -> None:
    (folder / LOAD_FILE).write_text(json.dumps(load_kwargs, indent=2, sort_keys=True))


def load_kwargs(folder: Path) -> dict:
    """from_pretrained arguments a folder needs: e.g. a quantization applied at load time.

    Users loading a registered artifact themselves pass the same (see README, Techniques).
    """
    path = folder / LOAD_FILE
    if not path.is_file():
        return {}
    kwargs = json.loads(path.read_text())
    if "quantization_config" in kwargs:
        from transformers.quantizers.auto import AutoQuantizationConfig

        kwargs["quantization_config"] = AutoQuantizationConfig.from_dict(kwargs["quantization_config"])
    return kwargs


def load_model(model_dir: Path, **kwargs):
    """Model (float32 unless told otherwise) and tokenizer from a save_pretrained folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": torch.float32, **load_kwargs(Path(model_dir)), **kwargs}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def save_model(model, tokenizer, out_dir: Path, **kwargs) -> None:
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)


def logits(model, ids):
    """Float32 logits on CPU for `ids`, computed on the model's own device."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(ids.to(device)).logits.float().cpu()


def weight_sparsity(model) -> float:
    """Fraction of exact zeros in the decoder's Linear weights (lm_head and embeddings excluded)."""
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.endswith("lm_head") or weight is None or weight.dim() != 2 or isinstance(module, torch.nn.Embedding):
            continue
        if weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0
