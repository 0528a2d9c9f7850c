"""The base model as it is: the reference every variant is gated against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from byoai.memory import Footprint, PlanContext, PROCESS_BYTES
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique


class BaselineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def run(inputs: BuildInputs) -> BuildResult:
    # Nothing to build: the input folder is already a saved artifact.
    return BuildResult(model_dir=inputs.model_dir, facts={"format": "safetensors"})


def baseline_footprint(config, ctx: PlanContext) -> Footprint:
    return Footprint(host=PROCESS_BYTES, artifact=ctx.input_bytes, why="nothing loaded: the input is the artifact")


TECHNIQUE = Technique(
    name="baseline",
    quantizes=False,
    summary="the base model unchanged",
    config=BaselineConfig,
    footprint=baseline_footprint,
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=False,
)
