"""Checks that need more than the schema but cost seconds: run by `byoai validate` and at the
start of `byoai run`, before any MLflow run exists, so a bad input fails at the door (exit 2)."""

from __future__ import annotations

from byoai.recipe import Recipe
from byoai.settings import Settings, hf_load_kwargs


def data_problems(recipe: Recipe) -> list[str]:
    """Each text source must hold enough tokens: more than one calibration window (windows are
    drawn at random from it) and at least one perplexity window. Counted with the model's own
    tokenizer when it is on this machine; otherwise with bytes, an upper bound on tokens."""
    from byoai.tasks.data import load_text
    from byoai.tasks.model import local_tokenizer_dir

    tokenizer_dir = local_tokenizer_dir(recipe.model, Settings().models_dir())
    tokenizer = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **hf_load_kwargs())
    checks = [
        ("calibration.source", recipe.calibration.source, recipe.calibration.seq_len + 1, "calibration.seq_len"),
        ("evaluation.perplexity.source", recipe.evaluation.perplexity.source, recipe.evaluation.perplexity.seq_len, "evaluation.perplexity.seq_len"),
    ]
    problems = []
    for field, source, needed, length_field in checks:
        if source.kind == "hf_dataset":  # needs the hub or its cache: checked when it is prepared
            continue
        text = load_text(source)
        if not text.strip():
            problems.append(f"{field}: the text is empty; give a file with text in it")
            continue
        count, unit = (len(tokenizer(text, add_special_tokens=False).input_ids), "tokens") if tokenizer else (len(text.encode()), "bytes")
        if count < needed:
            problems.append(f"{field}: {count} {unit}, fewer than the {needed} tokens one window needs ({length_field}); give more text or a shorter {length_field}")
    return problems
