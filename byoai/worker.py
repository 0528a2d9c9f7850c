"""The handlers a worker process runs (byoai.isolation forks workers from a server that has imported
this module, so torch and transformers are imported once): `build` runs one technique
(tasks.build.run_technique), `reload` the check of what it saved (tasks.build.run_reload_check),
`measure` one artifact in its runtime (tasks.runtimes.measure_request), `materialize` a GGUF model
into a folder (tasks.model.materialize_gguf), `serve` one artifact
served to concurrent users (tasks.serving.measure_serving), `speculate` a main model with a draft
(tasks.serving.measure_speculation).
"""

from __future__ import annotations

import json
from pathlib import Path

# What every worker needs, imported once in the forkserver before any worker is forked.
import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

from byoai.tasks.build import BuildRequest, ReloadRequest, run_reload_check, run_technique
from byoai.tasks.runtimes import MeasureRequest, measure_request


def _build(request: str):
    return run_technique(BuildRequest.model_validate_json(request))


def _reload(request: str):
    return run_reload_check(ReloadRequest.model_validate_json(request))


def _measure(request: str):
    return measure_request(MeasureRequest.model_validate_json(request))


def _materialize(request: str):
    from byoai.tasks.model import materialize_gguf

    args = json.loads(request)
    materialize_gguf(Path(args["gguf"]), Path(args["out"]), args["dtype"])


def _serve(request: str):
    from byoai.tasks.serving import ServeRequest, measure_serving

    return measure_serving(ServeRequest.model_validate_json(request))


def _speculate(request: str):
    from byoai.tasks.serving import ServeRequest, measure_speculation

    return measure_speculation(ServeRequest.model_validate_json(request))


HANDLERS = {"build": _build, "reload": _reload, "measure": _measure, "materialize": _materialize, "serve": _serve, "speculate": _speculate}
