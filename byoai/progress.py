"""Progress of a flow run, as the orchestration sees it: one event per step of a variant x target.

The flow emits; whoever listens in this process (the `byoai run` console) shows it. Nothing is
sent anywhere else: the Prefect UI has its own view of the same runs.

Three sources, one stream of events:
- the flow itself (a row is waiting, registering, done, failed, skipped);
- a task when its work really starts (`from_task`: building once it holds the build lock,
  evaluating once a runner slot runs it): the flow says which rows a task stands for when it
  submits it (`stands_for`), since one build can serve several variants;
- a worker process counting its own work (`advance`: steps, layers, tensors), read back by the
  process that started it (`StepRate`), which shows it as `building 23/60 steps`.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Stage = Literal["started", "waiting", "building", "evaluating", "registering", "done", "failed", "skipped", "pruned"]

# The file a worker process appends its progress to ("done total unit" lines); set by byoai.isolation.
PROGRESS_FILE_ENV = "BYOAI_PROGRESS_FILE"


@dataclass(frozen=True)
class Event:
    stage: Stage
    variant: str = ""
    target: str = ""
    runtime: str = ""
    detail: str = ""  # the result, the reason, progress, or (started) the MLflow parent run id


_listeners: list[Callable[[Event], None]] = []
_lock = threading.Lock()
_task_rows: dict[str, list[tuple[str, str, str]]] = {}


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


def stands_for(task_run_name: str, variant: str, target: str, runtime: str = "") -> None:
    """The flow, at submit: the task run of this name does the work of this row."""
    with _lock:
        rows = _task_rows.setdefault(task_run_name, [])
        if (variant, target, runtime) not in rows:
            rows.append((variant, target, runtime))


def from_task(stage: Stage, detail: str = "") -> None:
    """Inside a task: report for every row its task run stands for (none when a task runner ran it
    in another process: that process has no listener)."""
    from prefect.runtime import task_run

    with _lock:
        rows = list(_task_rows.get(task_run.get_name() or "", []))
    for variant, target, runtime in rows:
        emit(stage, variant, target, runtime, detail)


_last_write = 0.0


def advance(done: int, total: int, unit: str) -> None:
    """In a worker process: `done` of `total` units of its work are finished (at most two writes a
    second reach the file; the last unit always does)."""
    global _last_write
    path = os.environ.get(PROGRESS_FILE_ENV)
    now = time.monotonic()
    if not path or (now - _last_write < 0.5 and done < total):
        return
    _last_write = now
    with open(path, "a") as handle:
        handle.write(f"{done} {total} {unit}\n")


@contextmanager
def counting_calls(owner: type, name: str, total: int, unit: str) -> Iterator[None]:
    """While the block runs, every return from the library's own per-unit method `owner.name`
    (a layer of llm-compressor's sequential pipeline, a block of AutoRound) advances the count.

    Wrapping the method for the call's duration is the least intrusive hook: the library's loop is
    untouched, and nothing is written into the artifact (an llm-compressor modifier would be saved
    into its recipe.yaml). Builds run in worker processes, so the class is patched in one process.
    """
    original = owner.__dict__[name]
    wrapper = type(original) if isinstance(original, (classmethod, staticmethod)) else None
    function = original.__func__ if wrapper else original
    done = [0]

    @functools.wraps(function)
    def counted(*args, **kwargs):
        result = function(*args, **kwargs)
        done[0] += 1
        advance(min(done[0], total), total, unit)
        return result

    setattr(owner, name, wrapper(counted) if wrapper else counted)
    try:
        yield
    finally:
        setattr(owner, name, original)


@dataclass
class StepRate:
    """What the starting process makes of a worker's progress file: `23/60 steps, 1.2/s, ~31 s left`."""

    path: Path
    seen: int = 0
    first: tuple[float, int] | None = None  # (when, done) at the first line: loading is not a step

    def poll(self) -> tuple[str, float] | None:
        """The newest progress line and the fraction done, or None when nothing new was written."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return None
        if size == self.seen:
            return None
        self.seen = size
        lines = self.path.read_text().split("\n")
        last = next((line for line in reversed(lines) if line.count(" ") == 2), None)
        if last is None:
            return None
        done, total, unit = last.split(" ")
        done_n, total_n, now = int(done), max(int(total), 1), time.monotonic()
        since, done_then = self.first = self.first or (now, done_n)
        rate = (done_n - done_then) / (now - since) if now > since else 0.0
        text = f"{done_n}/{total_n} {unit}"
        if rate > 0 and done_n < total_n:
            per = f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.0f} s per {unit.rstrip('s')}"
            text += f", {per}, ~{(total_n - done_n) / rate:.0f} s left"
        return text, done_n / total_n
