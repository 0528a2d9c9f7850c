"""Real Prefect (a temporary server for the session), real MLflow stores, a tiny model built here."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

# Nothing in the test suite may reach a hub; a missing local file must fail loudly instead.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from tests.tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a BPE tokenizer trained on Python's own docs."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh project folder: BYOAI_HOME (MLflow store, variants, Prefect results) lives in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BYOAI_HOME", str(tmp_path / ".byoai"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BYOAI_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def write_recipe(workdir, tiny_model):
    """Write a tiny-model recipe; keyword arguments replace whole top-level sections."""

    def write(name: str = "tiny", **sections: str) -> Path:
        parts = {
            "model": f"{{kind: local, path: {tiny_model}}}",
            "calibration": "{source: {kind: builtin, split: train}, n_samples: 8, seq_len: 64, seed: 0}",
            "evaluation": textwrap.dedent("""
                perplexity: {source: {kind: builtin, split: test}, max_tokens: 512, seq_len: 128}
                latency: {prompt_tokens: 16, new_tokens: 4, warmup: 0, repeats: 2}""").replace("\n", "\n  "),
            "targets": "[cpu-x86, cuda-h100]",
            "variants": textwrap.dedent("""
                - {name: baseline, technique: baseline}
                - {name: rtn-w4-g32, technique: rtn, params: {bits: 4, group_size: 32}}
                - {name: gptq-w4-g32, technique: gptq, params: {bits: 4, group_size: 32}}""").replace("\n", "\n  "),
            "promotion": "{gate: {max_ppl_increase_pct: 50}, objective: smallest}",
        }
        parts.update(sections)
        body = f"name: {name}\n" + "".join(f"{key}: {value}\n" for key, value in parts.items())
        path = workdir / f"{name}.yaml"
        path.write_text(body)
        return path

    return write
