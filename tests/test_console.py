"""The console of `byoai run`: progress lines and the final table for people; every library's
output in a log file that also lands in MLflow."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from typer.testing import CliRunner

from byoai.cli import app


def test_run_prints_progress_and_results_and_logs_library_output_to_a_file(write_recipe, workdir):
    path = write_recipe(
        targets="[cpu-x86]",
        variants="[{name: gptq-w4-g32, technique: gptq, params: {bits: 4, group_size: 32}}, {name: bad-g48, technique: rtn, params: {group_size: 48}}]",
    )
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    # progress, one line per step of each variant x target (output is no terminal here: plain lines)
    assert "reference @ cpu-x86 [transformers]: done: ppl" in out
    assert "gptq-w4-g32 @ cpu-x86: building" in out and "gptq-w4-g32 @ cpu-x86 [transformers]: evaluating" in out
    assert "gptq-w4-g32 @ cpu-x86 [transformers]: done: ppl" in out
    assert "bad-g48 @ cpu-x86: failed: build failed: TechniqueError: group_size 48 does not divide" in out
    # then the table, the champion, how to open MLflow and where the log is
    assert "champion-cpu-x86: version 1" in out and "mlflow ui --backend-store-uri" in out
    # no library chatter, no bytecode dumps, no tracebacks on the console
    for noise in ("METRIC", "compress_module_list", "LOAD_GLOBAL", "RESUME", "Traceback", "Finished in state", "telemetry"):
        assert noise not in out, noise
    log = Path(out.split("full log: ")[1].split()[0])
    assert log.parent == workdir / ".byoai" / "logs" and "Creating initial MLflow database tables" in log.read_text()
    run_id = out.split("MLflow parent run ")[1].split(";")[0].split()[0]
    uri = f"sqlite:///{workdir / '.byoai' / 'mlflow.db'}"
    assert [a.path for a in MlflowClient(uri).list_artifacts(run_id, "logs")] == [f"logs/{log.name}"]
