"""Text for calibration and perplexity, tokenized once with the base model's tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from pydantic import BaseModel, ConfigDict

from byoai.files import file_sha256
from byoai.retry import retry_transient
from byoai.recipe import BuiltinText, CalibrationSpec, FileText, HubDatasetText, PerplexitySpec, TextSource
from byoai.settings import hf_load_kwargs
from byoai.tasks.model import ModelRef

CACHED = INPUTS + TASK_SOURCE


class TokensRef(BaseModel):
    """A token tensor saved as safetensors (key `input_ids`), identified by its content hash."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha: str
    shape: tuple[int, ...]


def python_docs(split: str) -> str:
    """The pydoc topics that ship with CPython: every 5th topic (sorted) is `test`, the rest `train`."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    keep = (lambda i: i % 5 == 0) if split == "test" else (lambda i: i % 5 != 0)
    return "\n\n".join(topics[name] for i, name in enumerate(names) if keep(i))


def load_text(source: TextSource) -> str:
    match source:
        case BuiltinText(split=split):
            return python_docs(split)
        case FileText(path=path) if path.suffix == ".jsonl":
            return "\n\n".join(json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip())
        case FileText(path=path):
            return path.read_text()
        case HubDatasetText():
            from datasets import load_dataset

            rows = load_dataset(source.path, source.name, split=source.split, revision=source.revision)
            # The GPTQ paper's WikiText-2 protocol joins rows with blank lines.
            return "\n\n".join(rows[source.text_field])


def tokenize(source: TextSource, model: ModelRef):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path, **hf_load_kwargs())
    ids = tokenizer(load_text(source), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.to(torch.long)


def _save(ids, folder: Path, stem: str) -> TokensRef:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({"input_ids": ids.contiguous()}, str(tmp))
    tmp.rename(path)
    return TokensRef(path=str(path), sha=file_sha256(path), shape=tuple(ids.shape))


def load_tokens(ref: TokensRef):
    return load_windows(ref.path)


def load_windows(path: str):
    from safetensors.torch import load_file

    return load_file(path)["input_ids"]


@task(cache_policy=CACHED, persist_result=True, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def prepare_calibration(spec: CalibrationSpec, model: ModelRef, data_dir: str) -> TokensRef:
    """n_samples random windows of seq_len tokens (seeded), as GPTQ and AWQ calibrate."""
    import torch

    ids = tokenize(spec.source, model)
    if len(ids) <= spec.seq_len:
        raise ValueError(
            f"calibration.source has {len(ids)} tokens, fewer than calibration.seq_len={spec.seq_len}; "
            "give more text or a shorter seq_len"
        )
    rng = random.Random(spec.seed)
    starts = [rng.randrange(0, len(ids) - spec.seq_len) for _ in range(spec.n_samples)]
    windows = torch.stack([ids[s : s + spec.seq_len] for s in starts])
    return _save(windows, Path(data_dir), f"calibration-{model.sha[:12]}-{spec.n_samples}x{spec.seq_len}-s{spec.seed}")


@task(cache_policy=CACHED, persist_result=True, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def prepare_perplexity_tokens(spec: PerplexitySpec, model: ModelRef, data_dir: str) -> TokensRef:
    """The first max_tokens tokens of the evaluation text, cut to whole seq_len windows."""
    ids = tokenize(spec.source, model)
    usable = min(len(ids), spec.max_tokens) // spec.seq_len * spec.seq_len
    if usable == 0:
        raise ValueError(
            f"evaluation.perplexity.source has {len(ids)} tokens, fewer than one window of "
            f"seq_len={spec.seq_len}; give more text or a shorter seq_len"
        )
    windows = ids[:usable].reshape(-1, spec.seq_len)
    return _save(windows, Path(data_dir), f"perplexity-{model.sha[:12]}-{usable}-{spec.seq_len}")


@task(cache_policy=CACHED, persist_result=True)
def first_windows(tokens: TokensRef, count: int, data_dir: str) -> TokensRef:
    """The first `count` windows of a perplexity set: an auto search's low-fidelity rung."""
    ids = load_tokens(tokens)[:count]
    return _save(ids, Path(data_dir), f"{Path(tokens.path).stem}-first{count}")
