"""The runtime registry: one module per runtime, one line per runtime below.

A runtime loads an artifact on a target and measures it by the shared protocol
(tasks.runtimes.protocol); a target profile lists the runtimes it ships in and how each is built
(`runtimes: {transformers: {}, llama_cpp: {cmake_args: [...]}}`). Every artifact has a format
(`hf`, `gguf`, `onnx`); a variant is measured on each of its target's runtimes that runs its format.
"""

from __future__ import annotations

import importlib

from byoai.tasks.runtimes.base import Measured, MeasureRequest, Runtime, RuntimeBuild, RuntimeUnavailable

# One line per runtime: the module in this package that defines RUNTIME.
_MODULES = (
    "transformers",
    "llama_cpp",
    "onnxruntime_genai",
)

RUNTIMES: dict[str, Runtime] = {
    r.name: r for r in (importlib.import_module(f"{__name__}.{m}").RUNTIME for m in _MODULES)
}


def runtimes_for(artifact_format: str) -> list[str]:
    return [name for name, runtime in RUNTIMES.items() if artifact_format in runtime.formats]


def measure_request(request: MeasureRequest) -> Measured:
    """Open the artifact in its runtime and run the shared protocol (in this process)."""
    from byoai.recipe import LatencySpec
    from byoai.tasks.lm_eval_tasks import LmEvalSpec
    from byoai.tasks.runtimes.protocol import measure
    from byoai.tasks.data import load_windows

    session = RUNTIMES[request.runtime].open_session(request)
    lm_eval = LmEvalSpec.model_validate(request.lm_eval) if request.lm_eval else None
    return measure(session, load_windows(request.windows_path), LatencySpec.model_validate(request.latency), lm_eval, request.parts, request.known_nll)


__all__ = ["RUNTIMES", "Measured", "MeasureRequest", "Runtime", "RuntimeBuild", "RuntimeUnavailable", "measure_request", "runtimes_for"]
