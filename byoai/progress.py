"""Progress of a flow run, as the orchestration sees it: one event per step of a variant x target.

The flow emits; whoever listens in this process (the `byoai run` console) shows it. Nothing is
sent anywhere else: the Prefect UI has its own view of the same runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

Stage = Literal["started", "queued", "building", "evaluating", "registering", "done", "failed", "skipped"]


@dataclass(frozen=True)
class Event:
    stage: Stage
    variant: str = ""
    target: str = ""
    runtime: str = ""
    detail: str = ""  # the result, the reason, or (started) the MLflow parent run id


_listeners: list[Callable[[Event], None]] = []
_lock = threading.Lock()


def emit(stage: Stage, variant: str = "", target: str = "", runtime: str = "", detail: str = "") -> None:
    event = Event(stage, variant, target, runtime, detail)
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(event)


@contextmanager
def listening(listener: Callable[[Event], None]) -> Iterator[None]:
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
