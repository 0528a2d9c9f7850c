"""build_variant: run one technique (one stage of a variant) into a content-addressed folder."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from byoai import progress
from byoai.files import atomic_folder, folder_sha256, folder_size_bytes, json_sha256
from byoai.log import step_logger
from byoai.tasks.data import CACHED, TokensRef, load_tokens
from byoai.tasks.model import ModelRef
from byoai.tasks.techniques import TECHNIQUES, BuildInputs, TechniqueError, one_build_per_process, probe_ids

_MARKER = ".byoai-artifact.json"

# Relative L2 distance allowed between in-memory and reloaded logits. Exact formats reload to
# ~1e-6; a corrupting round trip (bitsandbytes NF4 in 0.50) is off by far more.
RELOAD_TOLERANCE = 1e-3


class Artifact(BaseModel):
    """A built model folder. Named by content, not by variant: equal recipes share one build."""

    model_config = ConfigDict(frozen=True)

    technique: str
    path: str
    sha: str
    size_bytes: int
    build_s: float
    build_device: str
    facts: dict[str, Any]
    # "hf" (save_pretrained folder) or "gguf" (model.gguf + tokenizer files): which runtimes run it
    format: str = "hf"

    def as_model(self) -> ModelRef:
        """This artifact as the input of the next stage of a chain."""
        return ModelRef(path=self.path, sha=self.sha, source=f"artifact:{self.technique}")


def loaded_size_bytes(folder: Path, format: str) -> int:
    """An artifact's size as its runtime loads it, what a size budget holds: a GGUF artifact is its
    model.gguf (the tokenizer is inside it; the tokenizer files beside it serve lm-eval and the
    tests: 1.8 MB for SmolLM2), as the recipe's own input file is; any other format, its folder
    without a technique's report/ (logged to the run, not registered)."""
    from byoai.tasks.runtimes.llama_cpp import GGUF_FILE
    from byoai.tasks.techniques import REPORT_DIR

    if format == "gguf":
        return (folder / GGUF_FILE).stat().st_size
    return folder_size_bytes(folder) - (folder_size_bytes(folder / REPORT_DIR) if (folder / REPORT_DIR).is_dir() else 0)


def check_reload(folder: Path, in_memory_logits, ids, device: str, dtype: str = "auto") -> dict[str, float]:
    """Reload the saved folder; fail if it does not compute what the in-memory model computed.

    Also measures the reloaded weights' sparsity, so pruned variants report what was saved.
    """
    from byoai.tasks.techniques.io import load_model, logits, weight_sparsity

    import torch

    model, _ = load_model(folder, device_map=device, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    reloaded = logits(model, ids)
    rel_err = float((reloaded - in_memory_logits).norm() / in_memory_logits.norm())
    if not rel_err <= RELOAD_TOLERANCE:
        raise TechniqueError(
            f"the saved artifact does not reload to the model that was built: relative logit error "
            f"{rel_err:.3g} > {RELOAD_TOLERANCE:g} (silent corruption in the save/load round trip)"
        )
    return {"reload_rel_err": rel_err, "sparsity": weight_sparsity(model)}


class BuildRequest(BaseModel):
    """One stage to build, as the worker process (byoai.worker) receives it."""

    technique: str
    params: dict[str, Any]
    model_dir: str
    out_dir: str
    calibration: TokensRef
    device: str
    base_model_dir: str
    # where the worker leaves the built model's probe logits for the reload check (a file outside out_dir)
    probe_file: str


class BuildOutcome(BaseModel):
    """What the worker built: its facts, the format, or nothing new."""

    facts: dict[str, Any]
    format: str
    unchanged: bool  # the technique returned its input (baseline): the input is the artifact
    reload_check: bool  # probe logits were left in probe_file: the saved folder is to be checked


class ReloadRequest(BaseModel):
    """The reload check of a built folder, as its own worker process receives it."""

    folder: str
    probe_file: str
    device: str


def run_technique(request: BuildRequest) -> BuildOutcome:
    """In the worker: run the technique into out_dir; leave its probe logits for the reload check."""
    import torch

    spec = TECHNIQUES[request.technique]
    ids = load_tokens(request.calibration)
    out = Path(request.out_dir)
    result = spec.run(BuildInputs(
        Path(request.model_dir), out, spec.config.model_validate(request.params), ids, request.device, Path(request.base_model_dir),
    ))
    facts = json.loads(json.dumps(result.facts, default=str))
    unchanged = result.model_dir == Path(request.model_dir)
    if not unchanged and result.load_kwargs:
        from byoai.tasks.techniques.io import write_load_kwargs

        write_load_kwargs(out, result.load_kwargs)
    reload_check = not unchanged and result.probe_logits is not None
    if reload_check:
        torch.save({"logits": result.probe_logits, "ids": probe_ids(ids), "dtype": result.probe_dtype}, request.probe_file)
    return BuildOutcome(facts=facts, format=result.format, unchanged=unchanged, reload_check=reload_check)


def run_reload_check(request: ReloadRequest) -> dict[str, float]:
    """In a fresh worker: the saved folder against the built model's probe logits. Its own process,
    so nothing the technique's libraries still hold (llm-compressor's session, torch.fx's wrapped
    namespaces, allocator caches) sits beside the reloaded model: at 8B the in-process check was
    the build's peak (GPTQ: 22.7 GB = 1.54 x the bf16 size, against 18.3 GB while calibrating)."""
    import torch

    probe = torch.load(request.probe_file)
    return check_reload(Path(request.folder), probe["logits"], probe["ids"], request.device, probe["dtype"])


def build_progress(technique: str):
    """A long build's count (steps, layers, tensors) in its console rows, and every tenth of it in the log."""
    logged = [-1]

    def on_progress(text: str, fraction: float) -> None:
        progress.from_task("building", f"{technique} {text}")
        if int(fraction * 10) > logged[0]:
            logged[0] = int(fraction * 10)
            step_logger().info("building %s: %s", technique, text)

    return on_progress


@task(cache_policy=CACHED, persist_result=True)
def build_variant(
    technique: str,
    params: dict[str, Any],
    model: ModelRef | Artifact,
    base: ModelRef,
    calibration: TokensRef,
    device: str,
    variants_dir: str,
) -> Artifact:
    """Build one stage in a worker process (byoai.isolation): a build that runs out of memory or
    is killed fails this variant alone, and nothing of it is kept."""
    from byoai.isolation import run_worker

    if isinstance(model, Artifact):  # a chain: the previous stage's output is this stage's input
        model = model.as_model()
    spec = TECHNIQUES[technique]
    config = spec.config.model_validate(params)
    key = json_sha256(
        {
            "technique": technique,
            "params": config.model_dump(mode="json"),
            "model": model.sha,
            "base": base.sha if model.sha != base.sha else None,
            "calibration": calibration.sha if spec.needs_calibration else None,
            "device": device,
        }
    )
    folder = Path(variants_dir) / f"{technique}-{key[:16]}"
    marker = folder / _MARKER
    if marker.is_file():  # built by an earlier run whose Prefect cache is gone: trust the folder
        step_logger().info("reusing %s", folder)
        artifact = Artifact.model_validate_json(marker.read_text())
        # sized as today's byoai sizes it (a GGUF built before session 14 counted its tokenizer files)
        return artifact.model_copy(update={"size_bytes": loaded_size_bytes(Path(artifact.path), artifact.format)})

    with one_build_per_process(), atomic_folder(folder) as tmp:
        progress.from_task("building", technique)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="byoai-probe-") as probes:
            request = BuildRequest(
                technique=technique, params=config.model_dump(mode="json"), model_dir=model.path, out_dir=str(tmp),
                calibration=calibration, device=device, base_model_dir=base.path, probe_file=str(Path(probes, "probe.pt")),
            )
            outcome, peak, output = run_worker("build", request.model_dump_json(), name=f"byoai-{technique}", on_progress=build_progress(technique))
            if output.strip():
                step_logger().debug("build worker output (%s):\n%s", technique, output[-10000:])
            facts = outcome.facts | {"peak_mem_mb": round(peak / 1e6, 1)}
            if outcome.reload_check:
                progress.from_task("building", f"{technique}: reload check")
                check = ReloadRequest(folder=str(tmp), probe_file=request.probe_file, device=device)
                reloaded, reload_peak, output = run_worker("reload", check.model_dump_json(), name=f"byoai-{technique}-reload")
                if output.strip():
                    step_logger().debug("reload check output (%s):\n%s", technique, output[-10000:])
                # the step's peak is its largest process's: the technique's or the reload check's
                facts |= reloaded | {
                    "peak_mem_mb": round(max(peak, reload_peak) / 1e6, 1), "reload_peak_mem_mb": round(reload_peak / 1e6, 1),
                }
        build_s = time.perf_counter() - started
        if outcome.unchanged:
            built, sha, size = model.path, model.sha, loaded_size_bytes(Path(model.path), outcome.format)
        else:
            built, sha, size = str(folder), folder_sha256(tmp), loaded_size_bytes(tmp, outcome.format)
        artifact = Artifact(
            technique=technique, path=built, sha=sha, size_bytes=size,
            build_s=round(build_s, 3), build_device=device, facts=facts, format=outcome.format,
        )
        (tmp / _MARKER).write_text(artifact.model_dump_json())
    step_logger().info("built %s in %.1fs (peak %.0f MB) -> %s", technique, build_s, peak / 1e6, artifact.path)
    return artifact


@task(cache_policy=CACHED, persist_result=True)
def gguf_input_artifact(model: ModelRef, variants_dir: str) -> Artifact:
    """The recipe's GGUF file as an artifact of its own: model.gguf (a link to the file) + tokenizer."""
    import shutil

    from byoai.files import file_sha256
    from byoai.tasks.runtimes.llama_cpp import GGUF_FILE, gguf_facts
    from byoai.tasks.techniques.gguf import TOKENIZER_FILES

    source = Path(model.gguf)
    sha = file_sha256(source)
    folder = Path(variants_dir) / f"input-{sha[:16]}"
    if not (folder / _MARKER).is_file():
        with atomic_folder(folder) as tmp:
            (tmp / GGUF_FILE).symlink_to(source)
            for name in TOKENIZER_FILES:
                if (Path(model.path) / name).is_file():
                    shutil.copy2(Path(model.path) / name, tmp / name)
            artifact = Artifact(
                technique="input", path=str(folder), sha=sha, size_bytes=source.stat().st_size, build_s=0.0,
                build_device="cpu", facts={"source": str(source), **gguf_facts(source)}, format="gguf",
            )
            (tmp / _MARKER).write_text(artifact.model_dump_json())
    return Artifact.model_validate_json((folder / _MARKER).read_text())
