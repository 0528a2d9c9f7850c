"""Which variant x target pairs can run on this worker, and why not when they cannot."""

from __future__ import annotations

from byoai import devices
from byoai.recipe import TargetProfile, VariantSpec
from byoai.tasks.runtimes import RUNTIMES
from byoai.tasks.techniques import TECHNIQUES


def skip_reason(variant: VariantSpec, target: TargetProfile) -> str | None:
    for stage in variant.stages:
        technique = TECHNIQUES[stage.technique]
        if stage.technique not in target.techniques:
            return f"target {target.name} does not list technique {stage.technique} (its profile's `techniques`)"
        if target.device not in technique.devices:
            return f"technique {stage.technique} cannot run on {target.device} (it runs on {', '.join(sorted(technique.devices))})"
    reason = devices.unavailable_reason(target.device)
    return f"target {target.name} {reason}" if reason else None


def runtime_skip_reason(target: TargetProfile, runtime: str) -> str | None:
    """None when this worker can build and run the target's `runtime`; otherwise why not."""
    reason = RUNTIMES[runtime].unavailable_reason(target.runtime_config(runtime), target.device)
    return f"target {target.name}, runtime {runtime}: {reason}" if reason else None
