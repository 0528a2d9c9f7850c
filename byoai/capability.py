"""Which variant x target pairs can run on this worker, and why not when they cannot."""

from __future__ import annotations

from byoai import devices
from byoai.recipe import TargetProfile, VariantSpec
from tasks.techniques import TECHNIQUES


def skip_reason(variant: VariantSpec, target: TargetProfile) -> str | None:
    technique = TECHNIQUES[variant.technique]
    if variant.technique not in target.techniques:
        return f"target {target.name} does not list technique {variant.technique} (its profile's `techniques`)"
    if target.device not in technique.devices:
        return f"technique {variant.technique} cannot run on {target.device} (it runs on {', '.join(sorted(technique.devices))})"
    reason = devices.unavailable_reason(target.device)
    return f"target {target.name} {reason}" if reason else None
