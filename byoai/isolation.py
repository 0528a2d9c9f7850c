"""Heavy steps in a process of their own: an out-of-memory kill or a signal fails one step, never the flow.

Builds and evaluations run in a worker process (`python -m byoai.worker`). Each worker is the
kernel's first choice when memory runs out (its `oom_score_adj` is raised), dies with the flow
process (PR_SET_PDEATHSIG), and is reaped with `wait4`, so its true peak resident memory is known
even when it was killed. A worker's death is explained from what the kernel recorded: the signal,
and the cgroup's (or the machine's) count of OOM kills. SIGTERM to byoai stops every live worker
(`stop_all`) before the flow records the run as terminated.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from byoai import hostmem

# The most the kernel lets an unprivileged process ask: this worker dies before anything else.
WORKER_OOM_SCORE_ADJ = 1000
_PR_SET_PDEATHSIG = 1

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()
_stopping = threading.Event()


class WorkerKilled(RuntimeError):
    """A worker process was killed (by the OOM killer or a signal); str() says which, with numbers."""


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:.1f} GB"


def _system_oom_kills() -> int:
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _oom_counters() -> tuple[int, int]:
    return hostmem.oom_kills(), _system_oom_kills()


def _as_worker() -> None:
    """In the child before exec: the kernel's first OOM victim, and gone when its parent is."""
    try:
        Path("/proc/self/oom_score_adj").write_text(str(WORKER_OOM_SCORE_ADJ))
    except OSError:
        pass
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def death_reason(returncode: int, peak: int | None, oom_before: tuple[int, int]) -> str:
    """Why a worker that exited with `returncode` < 0 died, from the kernel's own counters."""
    sig = -returncode
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
    if sig == signal.SIGKILL and any(after > before for after, before in zip(_oom_counters(), oom_before)):
        return f"killed by the operating system: out of memory (peak {_gb(peak)}, limit {_gb(hostmem.limit_bytes())})"
    if _stopping.is_set():
        return f"stopped: byoai was terminated by signal (worker ended by {name}, peak {_gb(peak)})"
    return f"killed by {name} (peak {_gb(peak)})"


def run_worker(kind: str, request: str, env: dict[str, str] | None = None) -> tuple[Any, int | None, str]:
    """Run `python -m byoai.worker KIND` on a JSON request; return (result, peak RSS bytes, output).

    The worker writes its result (or the exception it raised) as a pickle; an exception is raised
    here again as it was, a death as WorkerKilled.
    """
    if _stopping.is_set():
        raise WorkerKilled("stopped: byoai was terminated by signal")
    with tempfile.TemporaryDirectory(prefix=f"byoai-{kind}-") as tmp:
        request_file, result_file, output = Path(tmp, "request.json"), Path(tmp, "result.pickle"), Path(tmp, "output.log")
        request_file.write_text(request)
        oom_before = _oom_counters()
        with open(output, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "byoai.worker", kind, str(request_file), str(result_file)],
                stdout=out, stderr=subprocess.STDOUT, env=env if env is not None else dict(os.environ), preexec_fn=_as_worker,
            )
        with _live_lock:
            _live.add(process)
        try:
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        finally:
            with _live_lock:
                _live.discard(process)
        peak = usage.ru_maxrss * 1024
        text = output.read_text(errors="replace")
        if process.returncode < 0:
            raise WorkerKilled(death_reason(process.returncode, peak, oom_before))
        if not result_file.is_file():
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise RuntimeError(f"the {kind} worker exited with {process.returncode} and no result:\n{tail}")
        ok, value = pickle.loads(result_file.read_bytes())
        if not ok:
            raise value
        return value, peak, text


def stop_all() -> None:
    """SIGTERM: stop every live worker (SIGKILL after 5 s) and start no new one."""
    _stopping.set()
    with _live_lock:
        live = list(_live)
    for process in live:
        try:
            process.terminate()
        except ProcessLookupError:
            pass
    timer = threading.Timer(5.0, lambda: [p.kill() for p in live if p.returncode is None])
    timer.daemon = True
    timer.start()


@contextlib.contextmanager
def workers_stopped_on_sigterm() -> Iterator[None]:
    """Inside a flow: SIGTERM first stops every worker, then goes to the handler that was there
    (Prefect's engine installs one that ends the flow run; byoai's CLI one under it)."""
    try:
        before = signal.getsignal(signal.SIGTERM)
    except ValueError:  # not the main thread: the process's own handler decides
        yield
        return

    def handler(signum, frame):
        stop_all()
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def worker_main(kind: str, request_file: str, result_file: str, handlers: dict[str, Any]) -> None:
    """The worker's side: run the handler, write (True, result) or (False, exception)."""
    request = Path(request_file).read_text()
    try:
        outcome = (True, handlers[kind](request))
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        exc.add_note("in the worker process:\n" + "".join(traceback.format_exception(exc)))
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that does not pickle is sent as text
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        outcome = (False, exc)
    Path(result_file).write_bytes(pickle.dumps(outcome))
