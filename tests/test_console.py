"""The console of `byoai run` as a user's terminal shows it: `byoai run` in a subprocess on a
pseudo-terminal (so rich draws its live table and Prefect believes it talks to a person), with
Prefect's telemetry settings and CI markers taken out of its environment."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from mlflow import MlflowClient

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def run_on_a_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    """What a 200-column terminal receives from the command, escape sequences removed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, env=env, stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # the terminal closed: the command and its children are done with it
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout)
    os.close(controller)
    assert process.returncode == 0, ANSI.sub("", b"".join(chunks).decode(errors="replace"))[-5000:]
    return ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def test_the_terminal_shows_byoai_progress_and_results_only(write_recipe, workdir):
    from prefect._internal.analytics.ci_detection import CI_ENV_VARS

    path = write_recipe(
        targets="[cpu-x86]",
        variants="[{name: baseline, technique: baseline}, {name: distill-300, technique: distill, params: {steps: 300, batch_size: 2}},"
        " {name: gptq-w4-g32, technique: gptq, params: {bits: 4, group_size: 32}}, {name: bad-g48, technique: rtn, params: {group_size: 48}}]",
    )
    drop = {"DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED", *CI_ENV_VARS}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    # a Prefect home that has never shown its telemetry notice
    env |= {"BYOAI_HOME": str(workdir / ".byoai"), "PREFECT_HOME": str(workdir / "prefect-home"), "TERM": "xterm-256color"}
    out = run_on_a_terminal([sys.executable, "-m", "byoai.cli", "run", str(path)], workdir, env)

    # nothing of Prefect's own: no telemetry notice, no log lines
    for noise in ("anonymous usage", "telemetry", "Stopping temporary server", "| INFO", "| WARNING", "prefect -", "Traceback", "METRIC"):
        assert noise not in out, noise
    # the live table: rows queued behind the one-build lock say so; a long build counts its steps
    # and layers with a rate and what is left
    assert re.search(r"gptq-w4-g32\s+│\s+cpu-x86\s+│\s+│\s+waiting", out), out[-3000:]  # its build, behind distill's
    assert re.search(r"baseline\s+│\s+cpu-x86\s+│\s+transformers\s+│\s+waiting", out), out[-3000:]  # its evaluation
    assert re.search(r"distill \d+/300 steps, [\d.]+ steps/s, ~\d+ s left", out), out[-3000:]
    # the counter counts the rows it shows: reference, baseline, distill, gptq, the failed rtn
    counters = re.findall(r"\((\d+)/(\d+) done", out)
    assert counters and counters[-1] == ("5", "5"), counters[-5:]
    assert all(int(done) <= int(shown) for done, shown in counters)
    # then the results, the champion, how to open MLflow and where the log is
    assert "bad-g48" in out and "group_size 48 does not divide" in out
    assert "champion-cpu-x86: version" in out and "mlflow ui --backend-store-uri" in out
    log = Path(out.split("full log: ")[-1].split()[0])
    text = log.read_text()
    assert log.parent == workdir / ".byoai" / "logs" and "Creating initial MLflow database tables" in text
    # progress reaches the log file too: steps of distill, layers of GPTQ (llm-compressor's pipeline)
    assert "building distill: 300/300 steps" in text and "building gptq: 2/2 layers" in text
    run_id = out.split("MLflow parent run ")[1].split()[0].rstrip(";")
    uri = f"sqlite:///{workdir / '.byoai' / 'mlflow.db'}"
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id, "logs")] == [f"logs/{log.name}"]
