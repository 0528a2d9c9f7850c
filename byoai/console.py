"""The console of `byoai run`: progress for people, library chatter in a log file.

While a run lasts, everything the libraries write (Python logging, print, tqdm bars, loguru,
C-level output of native code, Prefect's temporary server) goes to one log file under
BYOAI_HOME/logs/, at the file-descriptor level, so nothing slips past. The terminal shows one line
per variant x target: live (rich) when it is a terminal, plain lines when it is not (CI, a
worker's log). `--verbose` leaves the libraries' output on the terminal as it is. Prefect's own
run logs still reach its UI through its API handler.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from byoai import progress
from byoai.settings import Settings

_DONE = {"done", "failed", "skipped", "pruned"}


def log_path(home: Path, name: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Settings(home=home).logs_dir() / f"{name}-{stamp}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def terminal_stream():
    """A stream to the terminal that survives redirecting file descriptors 1 and 2 (or the
    in-memory stream a test harness put in sys.stdout)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return sys.stdout
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(sys.stdout, "encoding", None) or "utf-8", closefd=True)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send stdout and stderr, Python objects and file descriptors alike, to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "a", buffering=1) as log:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


class Reporter:
    """Rows of (variant, target): stage, runtime, elapsed, outcome or progress; a counter of the rows shown."""

    # plain lines (no terminal): a long step's progress at most this often per row
    PROGRESS_EVERY_S = 30.0

    def __init__(self, console: Console):
        self.console = console
        self.rows: dict[tuple[str, str], dict] = {}
        self.parent_run_id: str | None = None
        self.started = time.monotonic()
        self.live: Live | None = None

    def __call__(self, event: progress.Event) -> None:
        if event.stage == "started":
            self.parent_run_id = event.detail
            self.line(f"MLflow parent run {event.detail}")
            return
        key = (event.variant, event.target)
        row = self.rows.setdefault(key, {"since": time.monotonic(), "working": False, "runtime": "", "stage": "", "detail": "", "printed": 0.0})
        if row["stage"] in _DONE:  # a row that ended stays ended (a shared build's late progress)
            return
        same_stage = event.stage == row["stage"]
        if not row["working"] and event.stage not in ("waiting", *_DONE):
            row.update(since=time.monotonic(), working=True)  # elapsed counts from the first work, not the wait
        row.update(stage=event.stage, detail=event.detail)
        row["runtime"] = event.runtime or row["runtime"]
        if self.live is not None:
            self.live.update(self.table())
            return
        now = time.monotonic()
        if same_stage and (not event.detail or now - row["printed"] < self.PROGRESS_EVERY_S):
            return
        row["printed"] = now
        runtime = f" [{row['runtime']}]" if row["runtime"] else ""
        detail = f": {event.detail}" if event.detail else ""
        self.line(f"{event.variant} @ {event.target}{runtime}: {event.stage}{detail}{self.counter()}")

    def counter(self) -> str:
        finished = sum(1 for r in self.rows.values() if r["stage"] in _DONE)
        return f"  ({finished}/{len(self.rows)} done, {time.monotonic() - self.started:.0f} s)"

    def line(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, highlight=False)
        else:
            self.console.print(f"[{time.monotonic() - self.started:6.0f}s] {text}", highlight=False, markup=False)

    def table(self) -> Table:
        table = Table(title="byoai run" + self.counter(), title_justify="left", expand=False)
        for column in ("variant", "target", "runtime", "stage", "elapsed", ""):
            table.add_column(column)
        for (variant, target), row in self.rows.items():
            style = {"done": "green", "failed": "red", "skipped": "yellow", "pruned": "yellow", "waiting": "dim"}.get(row["stage"], "cyan")
            elapsed = "" if row["stage"] in (*_DONE, "waiting") else f"{time.monotonic() - row['since']:.0f} s"
            table.add_row(variant, target, row["runtime"], f"[{style}]{row['stage']}[/]", elapsed, row["detail"][:110])
        return table

    @contextlib.contextmanager
    def showing(self) -> Iterator[Reporter]:
        """Live table on a terminal (refreshed every second), plain lines elsewhere."""
        with progress.listening(self):
            if not self.console.is_terminal:
                yield self
                return
            with Live(self.table(), console=self.console, refresh_per_second=1, get_renderable=self.table) as live:
                self.live = live
                try:
                    yield self
                finally:
                    self.live = None

