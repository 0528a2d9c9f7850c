"""What a `byoai run` leaves behind if it dies, and how the next start cleans it up.

- Prefect's temporary server: byoai starts it itself (when no PREFECT_API_URL is set), records
  its pid in BYOAI_HOME/prefect-server.pid, stops it when the run ends, and stops a stale one
  from that file at the next start (its owner is gone).
- MLflow parent runs left RUNNING by a process that died (an OOM kill, SIGKILL): each parent run
  records its host and pid; `repair_stale_runs` marks FAILED only those whose process on this host
  is gone. A live run, on this host or on another worker of a shared server, is never touched.
- SIGTERM (`timeout`, a Prefect cancellation, Kubernetes): `terminate_on_sigterm` stops every
  worker process and raises Terminated in the flow, which records the parent run as FAILED
  `terminated by signal`; finished tasks stay cached for the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil

PID_FILE = "prefect-server.pid"
# How long byoai waits for Prefect's temporary server to answer (see temporary_prefect_server).
STARTUP_TIMEOUT_S = 120


class Terminated(BaseException):
    """byoai received SIGTERM (or SIGINT): the run stops and is recorded as terminated."""


def process_alive(pid: int, started: float | None) -> bool:
    """The process `pid` exists and is the one that was recorded (not a later reuse of the pid)."""
    try:
        process = psutil.Process(pid)
        return started is None or abs(process.create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_stale_server(home: Path) -> str | None:
    """Stop the temporary Prefect server an earlier byoai run left (its owner is gone)."""
    record_file = home / PID_FILE
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return None
    if process_alive(record["owner_pid"], record.get("owner_started")):
        return None  # another byoai run in this home still uses it
    stopped = None
    if process_alive(record["pid"], record.get("started")):
        server = psutil.Process(record["pid"])
        server.terminate()
        try:
            server.wait(10)
        except psutil.TimeoutExpired:
            server.kill()
        stopped = f"stopped a temporary Prefect server left by an earlier run (pid {record['pid']})"
    record_file.unlink(missing_ok=True)
    return stopped


@contextlib.contextmanager
def temporary_prefect_server(home: Path) -> Iterator[None]:
    """Prefect's temporary server for this run, started by byoai so that byoai can stop it: at the
    end of the run, and (from the pid file) at the next start if this process dies first."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():  # a real server: nothing temporary to look after
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    stop_stale_server(home)
    server = SubprocessASGIServer()  # the instance Prefect's own clients will find running
    # A fresh Prefect home migrates its database before the server answers: on a busy 2-core
    # worker that took longer than Prefect's 20 s default ("Timed out while attempting to connect
    # to ephemeral Prefect API server"), so byoai waits up to STARTUP_TIMEOUT_S unless told longer.
    server.start(timeout=max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), STARTUP_TIMEOUT_S))
    home.mkdir(parents=True, exist_ok=True)
    process = server.server_process
    (home / PID_FILE).write_text(json.dumps({
        "pid": process.pid, "started": psutil.Process(process.pid).create_time(),
        "owner_pid": os.getpid(), "owner_started": psutil.Process().create_time(),
    }))
    try:
        yield
    finally:
        # last: Prefect's log and event workers send what they hold first (as Prefect's own test
        # harness does), bounded, so that none is left retrying a stopped server at exit
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            worker.drain_all(timeout=10, at_exit=False)
        server.stop()
        (home / PID_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the worker processes and raises Terminated in the main thread (the flow)."""
    from byoai.isolation import stop_all

    def handler(signum, frame):
        stop_all()
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def repair_stale_runs(tracking_uri: str) -> list[tuple[str, str]]:
    """Mark FAILED the RUNNING parent runs of this host whose process is gone, with the reason,
    and their RUNNING child runs; return (run id, reason) for each."""
    from byoai.tasks.tracking import TAG, client

    mlflow = client(tracking_uri)
    host = socket.gethostname()
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    if not experiments:
        return []
    stale = mlflow.search_runs(
        experiments, f"tags.`{TAG}kind` = 'flow' and tags.`{TAG}host` = '{host}' and attributes.status = 'RUNNING'"
    )
    repaired = []
    for run in stale:
        pid = int(run.data.tags.get(f"{TAG}pid", "0") or 0)
        started = float(run.data.tags.get(f"{TAG}pid_started", "0") or 0) or None
        if pid and process_alive(pid, started):
            continue
        reason = (f"the byoai process that ran it (pid {pid} on {host}) is gone without recording an end: "
                  "it was killed (out of memory or a signal); found by a later byoai start")
        for child in mlflow.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'"):
            mlflow.set_terminated(child.info.run_id, "FAILED")
        mlflow.set_tag(run.info.run_id, f"{TAG}failure", reason)
        mlflow.set_terminated(run.info.run_id, "FAILED")
        repaired.append((run.info.run_id, reason))
    return repaired
