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
                latency: {prompt_tokens: 16, new_tokens: 4, warmup: 0, repeats: 2, prompt_lengths: [8, 32], batch_sizes: [1, 2]}""").replace("\n", "\n  "),
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


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (embedded), materialized once into the model cache."""
    from byoai.recipe import EmbeddedModel
    from byoai.settings import Settings
    from byoai.tasks.model import resolve_model

    return resolve_model.fn(EmbeddedModel(), str(Settings().models_dir()))


@pytest.fixture(scope="session")
def gguf_tiny_model(tmp_path_factory, smollm2) -> Path:
    """A 2-layer Llama (hidden 256: K-quants apply) with SmolLM2's tokenizer, which llama.cpp's
    converter knows (it refuses BPE tokenizers it has no hash for, like tiny_model's)."""
    return make_tiny_model(tmp_path_factory.mktemp("gguf-tiny") / "model", hidden=256, intermediate=512, tokenizer_dir=Path(smollm2.path))


@pytest.fixture(scope="session")
def gguf_tiny_ref(gguf_tiny_model):
    from byoai.files import folder_sha256
    from byoai.tasks.model import ModelRef

    return ModelRef(path=str(gguf_tiny_model), sha=folder_sha256(gguf_tiny_model), source="test:gguf-tiny")


@pytest.fixture(scope="session")
def gguf_bench(gguf_tiny_ref, tmp_path_factory):
    """The GGUF-convertible tiny model with 8 x 64 calibration tokens and 512 evaluation tokens."""
    return Bench(gguf_tiny_ref, tmp_path_factory.mktemp("gguf-bench"), n_samples=8, seq_len=64, eval_tokens=512, eval_seq_len=128)


@pytest.fixture(scope="session")
def tiny_ref(tiny_model):
    from byoai.files import folder_sha256
    from byoai.tasks.model import ModelRef

    return ModelRef(path=str(tiny_model), sha=folder_sha256(tiny_model), source="test:tiny")


class Bench:
    """Build and evaluate techniques directly (no flow, no MLflow) on one model and its data."""

    def __init__(self, model, folder: Path, n_samples: int, seq_len: int, eval_tokens: int, eval_seq_len: int):
        from byoai.recipe import BuiltinText, CalibrationSpec, PerplexitySpec
        from byoai.tasks.data import prepare_calibration, prepare_perplexity_tokens

        self.model, self.folder = model, folder
        self.calibration = prepare_calibration.fn(
            CalibrationSpec(source=BuiltinText(kind="builtin", split="train"), n_samples=n_samples, seq_len=seq_len),
            model, str(folder / "data"),
        )
        self.tokens = prepare_perplexity_tokens.fn(
            PerplexitySpec(source=BuiltinText(kind="builtin", split="test"), max_tokens=eval_tokens, seq_len=eval_seq_len),
            model, str(folder / "data"),
        )

    def build(self, technique: str, params: dict | None = None, model=None):
        """Artifact of one technique; `model` (default: the base) may be an earlier artifact's as_model()."""
        from byoai.tasks.build import build_variant
        from byoai.tasks.techniques import TECHNIQUES

        config = TECHNIQUES[technique].config.model_validate(params or {}).model_dump(mode="json")
        return build_variant.fn(technique, config, model or self.model, self.model, self.calibration, "cpu", str(self.folder / "variants"))

    def evaluate(self, artifact, device: str = "cpu", runtime: str = "transformers", lm_eval=None):
        """Metrics of the artifact loaded from disk in `runtime` (perplexity, size, latency);
        llama_cpp uses this worker's native build (compiled by infra/install.sh)."""
        from byoai.recipe import LatencySpec, TargetProfile
        from byoai.settings import Settings
        from byoai.tasks.evaluate import evaluate_in_runtime
        from byoai.tasks.runtime_build import build_runtime

        target = TargetProfile(name=f"test-{device}", device=device, techniques=(artifact.technique,), runtimes={"transformers": {}, runtime: {}})
        build = build_runtime.fn(runtime, target.runtimes[runtime], str(Settings().cache_dir))
        latency = LatencySpec(prompt_tokens=16, new_tokens=4, warmup=0, repeats=1, batch_sizes=(1, 2))
        return evaluate_in_runtime.fn(artifact, target, runtime, build, self.tokens, latency, lm_eval)


@pytest.fixture(scope="session")
def tiny_bench(tiny_ref, tmp_path_factory) -> Bench:
    """The tiny model with 8 x 64 calibration tokens and 512 evaluation tokens."""
    return Bench(tiny_ref, tmp_path_factory.mktemp("tiny-bench"), n_samples=8, seq_len=64, eval_tokens=512, eval_seq_len=128)


@pytest.fixture(scope="session")
def smol_bench(smollm2, tmp_path_factory) -> Bench:
    """SmolLM2-135M with 16 x 256 calibration tokens and 2,048 evaluation tokens (CI-sized)."""
    return Bench(smollm2, tmp_path_factory.mktemp("smol-bench"), n_samples=16, seq_len=256, eval_tokens=2048, eval_seq_len=512)
