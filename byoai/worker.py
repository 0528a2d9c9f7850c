"""`python -m byoai.worker KIND REQUEST.json RESULT.pickle`: one heavy step in a process of its own.

KIND `build` runs one technique (tasks.build.run_technique), `measure` one artifact in its runtime
(tasks.runtimes.measure_request), `materialize` a GGUF model into a folder
(tasks.model.materialize_gguf). byoai.isolation starts it, watches it and explains its death.
"""

from __future__ import annotations

import sys


def _build(request: str):
    from byoai.tasks.build import BuildRequest, run_technique

    return run_technique(BuildRequest.model_validate_json(request))


def _measure(request: str):
    from byoai.tasks.runtimes import MeasureRequest, measure_request

    return measure_request(MeasureRequest.model_validate_json(request))


def _materialize(request: str):
    import json
    from pathlib import Path

    from byoai.tasks.model import materialize_gguf

    args = json.loads(request)
    materialize_gguf(Path(args["gguf"]), Path(args["out"]), args["dtype"])


if __name__ == "__main__":
    from byoai.isolation import worker_main

    worker_main(*sys.argv[1:4], handlers={"build": _build, "measure": _measure, "materialize": _materialize})
