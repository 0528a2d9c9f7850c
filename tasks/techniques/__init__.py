"""The technique registry: one module per technique, one line per technique below.

A technique turns a model folder into a model folder plus facts. Each module defines a typed
config (pydantic) and `run`; the flow never needs to change when a technique is added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class TechniqueError(Exception):
    """A variant cannot be built as configured; the message tells the user what to change."""


@dataclass(frozen=True)
class BuildResult:
    model_dir: Path
    facts: dict[str, Any]


@dataclass(frozen=True)
class Technique:
    name: str
    summary: str
    config: type[BaseModel]
    # run(model_dir, out_dir, config, calibration_ids, device) -> BuildResult. calibration_ids
    # is a LongTensor [n_samples, seq_len] or None when needs_calibration is False.
    run: Callable[..., BuildResult]
    # Devices the technique can build on and whose output runs there.
    devices: frozenset[str]
    needs_calibration: bool


def _registry() -> dict[str, Technique]:
    from tasks.techniques import baseline, gptq, rtn

    return {t.name: t for t in (baseline.TECHNIQUE, rtn.TECHNIQUE, gptq.TECHNIQUE)}


TECHNIQUES: dict[str, Technique] = _registry()
