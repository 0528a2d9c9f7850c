"""build_variant: run one technique on the base model into a content-addressed folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from byoai.log import step_logger
from byoai.files import atomic_folder, folder_sha256, folder_size_bytes, json_sha256
from tasks.data import CACHED, TokensRef, load_tokens
from tasks.model import ModelRef
from tasks.techniques import TECHNIQUES

_MARKER = ".byoai-artifact.json"


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


@task(cache_policy=CACHED, persist_result=True)
def build_variant(
    technique: str,
    params: dict[str, Any],
    model: ModelRef,
    calibration: TokensRef | None,
    device: str,
    variants_dir: str,
) -> Artifact:
    spec = TECHNIQUES[technique]
    config = spec.config.model_validate(params)
    key = json_sha256(
        {
            "technique": technique,
            "params": config.model_dump(mode="json"),
            "model": model.sha,
            "calibration": calibration.sha if spec.needs_calibration and calibration else None,
            "device": device,
        }
    )
    folder = Path(variants_dir) / f"{technique}-{key[:16]}"
    marker = folder / _MARKER
    if marker.is_file():  # built by an earlier run whose Prefect cache is gone: trust the folder
        step_logger().info("reusing %s", folder)
        return Artifact.model_validate_json(marker.read_text())

    ids = load_tokens(calibration) if spec.needs_calibration and calibration else None
    started = time.perf_counter()
    with atomic_folder(folder) as tmp:
        result = spec.run(Path(model.path), tmp, config, ids, device)
        build_s = time.perf_counter() - started
        built = Path(model.path) if result.model_dir == Path(model.path) else folder
        source = tmp if built == folder else built
        artifact = Artifact(
            technique=technique,
            path=str(built),
            sha=model.sha if built == Path(model.path) else folder_sha256(source),
            size_bytes=folder_size_bytes(source),
            build_s=round(build_s, 3),
            build_device=device,
            facts=json.loads(json.dumps(result.facts, default=str)),
        )
        (tmp / _MARKER).write_text(artifact.model_dump_json())
    step_logger().info("built %s in %.1fs -> %s", technique, build_s, artifact.path)
    return artifact
