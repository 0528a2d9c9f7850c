"""Heavy steps in a process of their own: an out-of-memory kill or a signal fails one step, never the flow.

Builds, evaluations and GGUF materializing run in a worker process forked from a forkserver
(multiprocessing's, the way PyTorch's data loaders start theirs) that has torch and transformers
imported already: a worker starts in milliseconds instead of the seconds a fresh interpreter
needs. The forkserver is single-threaded and has run no torch op, so forking it is safe. Each
worker takes the caller's environment, working directory and PYTHONPATH (a compiled runtime's
build), is the kernel's first choice when memory runs out (its `oom_score_adj` is raised), and
dies with its parent (PR_SET_PDEATHSIG; the forkserver ends with the flow). Its peak resident
memory (VmHWM, and the largest of the tools it ran) is reported by the worker itself and watched
from here, so a killed worker's peak is known too. A worker's death is explained from what the
kernel recorded: the signal, and the cgroup's (or the machine's) count of OOM kills. SIGTERM to
byoai stops every live worker (`stop_all`) before the flow records the run as terminated.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import resource
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from byoai import hostmem, progress

# The most the kernel lets an unprivileged process ask: this worker dies before anything else.
WORKER_OOM_SCORE_ADJ = 1000
_PR_SET_PDEATHSIG = 1

# torch and transformers imported once, in the forkserver (byoai.worker imports them)
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["byoai.worker"])
_PR_SET_NAME = 15

_live: set[multiprocessing.process.BaseProcess] = set()
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


def _as_worker(name: str) -> None:
    """In the worker: the kernel's first OOM victim, gone when its parent is, named for `ps`."""
    try:
        Path("/proc/self/oom_score_adj").write_text(str(WORKER_OOM_SCORE_ADJ))
    except OSError:
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(_PR_SET_NAME, name.encode()[:15])
    except (OSError, AttributeError):
        pass


def _vm_hwm(pid: int | str = "self") -> int | None:
    """A live process's resident high-water mark (VmHWM), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def own_peak() -> int:
    """This worker's peak, or that of the largest tool it ran (llama-quantize, the converter)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return max(_vm_hwm() or 0, children)


def death_reason(returncode: int, peak: int | None, oom_before: tuple[int, int]) -> str:
    """Why a worker that exited with `returncode` < 0 died, from the kernel's own counters."""
    sig = -returncode
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
    if sig == signal.SIGKILL and any(after > before for after, before in zip(_oom_counters(), oom_before)):
        return f"killed by the operating system: out of memory (peak {_gb(peak)}, limit {_gb(hostmem.limit_bytes())})"
    if _stopping.is_set():
        return f"stopped: byoai was terminated by signal (worker ended by {name}, peak {_gb(peak)})"
    return f"killed by {name} (peak {_gb(peak)})"


def run_worker(
    kind: str, request: str, env: dict[str, str] | None = None, name: str | None = None,
    on_progress: Callable[[str, float], None] | None = None,
) -> tuple[Any, int | None, str]:
    """Run byoai.worker's KIND handler on a JSON request in a worker process; return (result,
    peak RSS bytes, its output). An exception the handler raised is raised here again as it was,
    a death as WorkerKilled. `env` is the worker's environment (default: this process's); `name`
    its process name (default byoai-KIND); `on_progress(text, fraction)` hears what the worker
    counts with byoai.progress.advance, as it goes."""
    if _stopping.is_set():
        raise WorkerKilled("stopped: byoai was terminated by signal")
    with tempfile.TemporaryDirectory(prefix=f"byoai-{kind}-") as tmp:
        request_file, result_file, output = Path(tmp, "request.json"), Path(tmp, "result.pickle"), Path(tmp, "output.log")
        request_file.write_text(request)
        steps = progress.StepRate(Path(tmp, "progress"))
        environment = dict(env if env is not None else os.environ) | {progress.PROGRESS_FILE_ENV: str(steps.path)}
        oom_before = _oom_counters()
        process = _CONTEXT.Process(
            target=_worker_entry, name=name or f"byoai-{kind}",
            args=(kind, str(request_file), str(result_file), str(output), environment, os.getcwd(), name or f"byoai-{kind}"),
        )
        process.start()
        with _live_lock:
            _live.add(process)
        watched = 0
        try:
            while process.is_alive():  # its high-water mark, for a worker that gets killed
                watched = max(watched, _vm_hwm(process.pid) or 0)
                if on_progress is not None and (news := steps.poll()) is not None:
                    on_progress(*news)
                process.join(0.5)
        finally:
            with _live_lock:
                _live.discard(process)
        if on_progress is not None and (news := steps.poll()) is not None:  # what it wrote last
            on_progress(*news)
        text = output.read_text(errors="replace") if output.is_file() else ""
        if process.exitcode < 0:
            raise WorkerKilled(death_reason(process.exitcode, watched or None, oom_before))
        if not result_file.is_file():
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise RuntimeError(f"the {kind} worker exited with {process.exitcode} and no result:\n{tail}")
        ok, value, peak = pickle.loads(result_file.read_bytes())
        if not ok:
            raise value
        return value, max(peak, watched), text


def stop_all() -> None:
    """SIGTERM: stop every live worker (SIGKILL after 5 s) and start no new one."""
    _stopping.set()
    with _live_lock:
        live = list(_live)
    for process in live:
        try:
            process.terminate()
        except (ProcessLookupError, AttributeError):
            pass
    timer = threading.Timer(5.0, lambda: [p.kill() for p in live if p.is_alive()])
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


def _worker_entry(kind: str, request_file: str, result_file: str, output: str, env: dict[str, str], cwd: str, name: str) -> None:
    """The worker's side: the caller's environment, folder and import path; the handler's result
    (or the exception it raised) and this worker's peak, pickled to result_file."""
    _as_worker(name)
    # The forkserver hands every worker the flow's "alive" pipe, and stays up while any holder
    # lives: a worker must not hold it, or a dead flow would leave the forkserver and the worker
    # running. Without it the forkserver exits with the flow, and PR_SET_PDEATHSIG ends the worker.
    from multiprocessing import forkserver

    if (alive := forkserver._forkserver._forkserver_alive_fd) is not None:
        os.close(alive)
        forkserver._forkserver._forkserver_alive_fd = None
    log = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.clear()
    os.environ.update(env)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    os.chdir(cwd)
    from byoai.worker import HANDLERS

    request = Path(request_file).read_text()
    try:
        outcome = (True, HANDLERS[kind](request))
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        exc.add_note("in the worker process:\n" + "".join(traceback.format_exception(exc)))
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that does not pickle is sent as text
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        outcome = (False, exc)
    sys.stdout.flush()
    sys.stderr.flush()
    Path(result_file).write_bytes(pickle.dumps((*outcome, own_peak())))
