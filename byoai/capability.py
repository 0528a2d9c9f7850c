"""Which variant x target pairs can run on this worker, and why not when they cannot."""

from __future__ import annotations

from byoai import devices
from byoai.recipe import TargetProfile, VariantSpec
from tasks.techniques import TECHNIQUES


def skip_reason(variant: VariantSpec, target: TargetProfile) -> str | None:
    for stage in variant.stages:
        technique = TECHNIQUES[stage.technique]
        if stage.technique not in target.techniques:
            return f"target {target.name} does not list technique {stage.technique} (its profile's `techniques`)"
        if target.device not in technique.devices:
            return f"technique {stage.technique} cannot run on {target.device} (it runs on {', '.join(sorted(technique.devices))})"
    reason = devices.unavailable_reason(target.device)
    return f"target {target.name} {reason}" if reason else None
