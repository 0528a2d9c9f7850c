"""Whether two models share one vocabulary: a speculative draft must propose the main model's token
ids, so a draft whose tokens differ (another tokenizer, a resized vocabulary) is refused at the door."""

from __future__ import annotations

import json
from pathlib import Path


def gguf_tokens(path: Path) -> list[str]:
    """The token strings a GGUF file's tokenizer holds, by id (`tokenizer.ggml.tokens`)."""
    from byoai.files import gguf_reader

    field = gguf_reader(path).fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise ValueError(f"{path} has no tokenizer (no tokenizer.ggml.tokens)")
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def folder_tokens(folder: Path) -> list[str]:
    """The token strings of a save_pretrained folder's tokenizer.json (added tokens included), by
    id, padded to config.json's vocab_size the way llama.cpp's converter pads them."""
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"]) if isinstance(data["model"].get("vocab"), dict) else {}
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = max(vocab.values(), default=-1) + 1
    config = json.loads((folder / "config.json").read_text())
    size = max(size, int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 0))
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, i in vocab.items():
        tokens[i] = token
    return tokens


def mismatch(draft: list[str], model: list[str]) -> str | None:
    """How the draft's vocabulary differs from the model's, or None when they are the same."""
    if len(draft) != len(model):
        return f"the draft has {len(draft)} tokens, the model {len(model)}"
    first = next((i for i, (a, b) in enumerate(zip(draft, model)) if a != b and not (a.startswith("[PAD") and b.startswith("[PAD"))), None)
    if first is not None:
        return f"token {first} is {draft[first]!r} in the draft, {model[first]!r} in the model"
    return None
