"""The base model as it is: the reference every variant is gated against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from byoai.tasks.techniques import BuildInputs, BuildResult, Technique


class BaselineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def run(inputs: BuildInputs) -> BuildResult:
    # Nothing to build: the input folder is already a saved artifact.
    return BuildResult(model_dir=inputs.model_dir, facts={"format": "safetensors"})


TECHNIQUE = Technique(
    name="baseline",
    summary="the base model unchanged",
    config=BaselineConfig,
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=False,
)
