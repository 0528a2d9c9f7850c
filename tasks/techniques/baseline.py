"""The base model as it is: the reference every variant is gated against."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks.techniques import BuildResult, Technique


class BaselineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def run(model_dir: Path, out_dir: Path, config: BaselineConfig, calibration_ids, device: str) -> BuildResult:
    # Nothing to build: the base model folder is already a saved artifact.
    return BuildResult(model_dir=model_dir, facts={"format": "safetensors"})


TECHNIQUE = Technique(
    name="baseline",
    summary="the base model unchanged",
    config=BaselineConfig,
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=False,
)
