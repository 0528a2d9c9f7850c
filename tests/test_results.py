"""Persisted task results are JSON; a pickle, tampered or truncated record is a cache miss that is
recomputed, and never executes code."""

from __future__ import annotations

import json
from pathlib import Path

from byoai.recipe import load_recipe
from byoai.flows.optimize import run_optimize
from tests.test_flow import mlflow_client, task_states


class Planted:
    """Unpickling this creates a file: what a tampered pickle result could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def records(workdir: Path) -> dict[Path, dict]:
    folder = workdir / ".byoai" / "prefect-results"
    return {p: json.loads(p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def test_results_are_json_and_a_tampered_record_is_recomputed_not_executed(write_recipe, workdir):
    from prefect.serializers import PickleSerializer

    recipe = load_recipe(write_recipe(targets="[cpu-x86]", variants="[{name: rtn, technique: rtn, params: {group_size: 32}}]"))
    first = run_optimize(recipe)
    stored = records(workdir)  # every file parses as JSON (json.loads above)
    with_metadata = {p: r for p, r in stored.items() if isinstance(r, dict) and "metadata" in r}
    assert len(with_metadata) >= 5
    assert {r["metadata"]["serializer"]["type"] for r in with_metadata.values()} == {"json"}
    assert all("byoai." in r["result"] for r in with_metadata.values())

    # replace every record by a pickle that would plant a file, or by garbage
    marker = workdir / "planted"
    for i, (path, record) in enumerate(sorted(with_metadata.items())):
        if i % 2:
            path.write_bytes(b"\x80\x04garbage")
            continue
        record["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}
        record["result"] = PickleSerializer().dumps(Planted(str(marker))).decode()
        path.write_text(json.dumps(record))
    import time

    second_run = time.time()
    again = run_optimize(recipe)
    assert not marker.exists()
    assert again.results[0].status == "finished" and again.results[0].ppl == first.results[0].ppl
    states = task_states(mlflow_client(workdir).get_run(again.parent_run_id).data.tags["prefect.flow_run_id"])
    assert "Completed" in {s for n, s in states.items() if n.startswith(("build", "evaluate", "prepare"))}
    # what the second run wrote (the recomputed steps) is JSON again; the first run's per-run
    # records (e.g. resolve_model's, keyed by its flow run) are never read again
    folder = workdir / ".byoai" / "prefect-results"
    fresh = [json.loads(p.read_bytes()) for p in folder.iterdir() if p.stat().st_mtime >= second_run]
    rewritten = [r for r in fresh if isinstance(r, dict) and "metadata" in r]
    assert len(rewritten) >= 3 and {r["metadata"]["serializer"]["type"] for r in rewritten} == {"json"}
