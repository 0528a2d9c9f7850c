"""Dataset loaders for the shipped lm-eval tasks (`custom_dataset: !function byoai_tasks.…`).

The data are read from the .jsonl files beside this module whatever the working directory is,
and never touch the network or the Hugging Face datasets cache. Rebuild them with build_data.py.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _dataset(splits: dict[str, str]):
    import datasets

    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(
                [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
            )
            for split, name in splits.items()
        }
    )


def pydoc_cloze(**_metadata):
    return _dataset({"test": "pydoc_cloze.jsonl", "dev": "pydoc_cloze_dev.jsonl"})


def pydoc_ppl(**_metadata):
    return _dataset({"test": "pydoc_ppl.jsonl"})
