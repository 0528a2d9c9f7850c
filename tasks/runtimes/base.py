"""What every runtime module defines, and what it hands back: typed, JSON-serializable records.

A runtime loads an artifact (a model folder of one `format`) on a target and measures it by the
shared protocol (tasks.runtimes.protocol). A runtime that is compiled per target (llama.cpp)
builds once per (version, flags, host) into BYOAI_CACHE_DIR; its measurements run in their own
process, so two builds of one runtime (native and portable) can be measured in one flow run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict


class RuntimeUnavailable(Exception):
    """This worker cannot build or run the runtime as the target profile asks; str() says why."""


class RuntimeBuild(BaseModel):
    """One build of a runtime on this host: what was compiled, how, and where it lives."""

    model_config = ConfigDict(frozen=True)

    runtime: str
    key: str  # identifies the build: version, flags and (for native builds) the CPU's features
    path: str  # folder of the build ("" for a runtime installed with byoai itself)
    version: str
    flags: tuple[str, ...] = ()
    compiler: str = ""
    system_info: str = ""
    build_s: float = 0.0
    # `llama-server --version` of a build that has the server (what tasks.serving runs)
    server_version: str = ""
    # Features of the CPU a native build was compiled for; a native build never runs on another.
    native_cpu: str | None = None


class Measured(BaseModel):
    """What the protocol measures on a loaded artifact (tasks.evaluate adds size and names)."""

    model_config = ConfigDict(frozen=True)

    ppl: float
    ppl_tokens: int
    window_nll: tuple[float, ...] = ()  # each window's summed NLL, in order
    load_s: float
    prefill_ms: float
    decode_tok_s: float
    device: str
    profile: dict[str, float] = {}
    tasks: dict[str, dict] = {}


class MeasureRequest(BaseModel):
    """Everything a runtime needs to measure one artifact; sent as JSON to an isolated worker."""

    model_config = ConfigDict(frozen=True)

    runtime: str
    artifact_path: str  # the artifact's folder
    artifact_format: str
    device: str
    dtype: str
    threads: int | None
    build: RuntimeBuild
    windows_path: str  # perplexity windows (safetensors, key input_ids), the same ids in every runtime
    latency: dict[str, Any]  # byoai.recipe.LatencySpec as JSON
    # an auto search's rung measures a part: "perplexity" (no latency profile, no tasks) or "speed"
    # (a short latency profile, no perplexity); "all" is the whole protocol
    parts: Literal["all", "perplexity", "speed"] = "all"
    # the summed NLLs of the first windows, scored already on this artifact in this runtime (an
    # auto search's last rung): the full protocol does not score them again
    known_nll: tuple[float, ...] = ()
    lm_eval: dict[str, Any] | None = None  # tasks.lm_eval_tasks.LmEvalSpec as JSON


class Session(Protocol):
    """A loaded artifact, as the shared protocol drives it. Token ids in, numbers out."""

    device: str  # "cpu" or "cuda"
    description: str  # the hardware and runtime the numbers were measured on
    load_s: float

    def nll(self, window) -> float:
        """Sum of the negative log-likelihoods of window[1:] given the tokens before each."""

    def prefill(self, prompts) -> Any:
        """Process a [batch, length] prompt from an empty state; return the decode state."""

    def decode(self, state, steps: int) -> None:
        """Greedy-decode `steps` tokens per sequence from the state prefill returned."""

    def sync(self) -> None:
        """Wait until queued device work is done (timing boundaries)."""

    def memory(self) -> dict[str, float]:
        """weights_mb (weights as held in memory) and peak_mem_mb of this process."""

    def lm_eval_model(self, spec):
        """An lm-eval LM scoring with this session (what lm-eval ships where it can)."""


def inherited_env() -> dict[str, str]:
    """A worker's environment when its runtime needs nothing of its own: this process's."""
    return dict(os.environ)


@dataclass(frozen=True)
class Runtime:
    name: str
    summary: str
    formats: frozenset[str]  # artifact formats it runs ("hf": save_pretrained folder, "gguf")
    devices: frozenset[str]
    config: type[BaseModel]  # how a target profile builds it (runtimes: {name: {...}})
    # (config, device) -> None, or why this worker cannot build or run it (a skip reason)
    unavailable_reason: Callable[[BaseModel, str], str | None]
    # (config, cache_dir) -> the build, compiled once and kept under cache_dir
    build: Callable[[BaseModel, Path], RuntimeBuild]
    # a loaded artifact for the protocol
    open_session: Callable[[MeasureRequest], Session]
    # (byoai.memory.PlanContext, artifact bytes on disk) -> byoai.memory.Footprint: the peak of
    # measuring an artifact of that model's shape (the memory plan adds these up)
    footprint: Callable[[Any, int], Any]
    # The environment of the worker process that measures with a build (every runtime measures in
    # a process of its own; a compiled runtime puts its build first on PYTHONPATH).
    worker_env: Callable[[RuntimeBuild], dict[str, str]] = lambda build: inherited_env()
    # A runtime that serves its artifacts over an OpenAI-compatible HTTP API (tasks.serving):
    # (build, tasks.serving.ServerSpec) -> (argv without host, port and key; its environment), and
    # the artifact's file it serves. None: no serving runtime.
    server_command: Callable[[RuntimeBuild, Any], tuple[list[str], dict[str, str]]] | None = None
    served_file: str = ""
