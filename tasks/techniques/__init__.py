"""The technique registry: one module per technique, one line per technique below.

A technique turns a model folder into a model folder plus facts. Each module defines a typed
config (pydantic) and `run(BuildInputs) -> BuildResult`; the flow never changes when one is added.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class TechniqueError(Exception):
    """A variant cannot be built as configured; the message tells the user what to change."""


@dataclass(frozen=True)
class BuildInputs:
    model_dir: Path  # this stage's input: the base model, or the previous stage's output in a chain
    out_dir: Path  # an empty folder to save the result into (written atomically by the caller)
    config: BaseModel  # the technique's own typed config
    calibration_ids: Any  # LongTensor [n_samples, seq_len]: calibration windows of the recipe
    device: str  # "cpu" or "cuda": where to build
    base_model_dir: Path  # the recipe's base model (e.g. the teacher for distillation)


# A folder in a technique's output with what it wants shown, not shipped (tables, plots): logged
# to the variant's MLflow run, left out of the registered model.
REPORT_DIR = "report"


@dataclass(frozen=True)
class BuildResult:
    model_dir: Path
    facts: dict[str, Any]
    # Logits of the in-memory result on `probe_ids(calibration_ids)`. When given, the build step
    # reloads the saved folder and fails the variant if its logits diverge (silent corruption).
    probe_logits: Any = None
    # The dtype the probe logits were computed in, which the reload check loads the folder in
    # ("auto": the checkpoint's own; GPTQModel's references are float32 upcasts)
    probe_dtype: str = "auto"
    # Keyword arguments for from_pretrained that the saved folder needs (e.g. a quantization config
    # applied at load time); written to byoai_load.json beside the weights.
    load_kwargs: dict[str, Any] | None = None
    # What the folder holds: "hf" (a save_pretrained folder) or "gguf" (model.gguf + tokenizer);
    # it decides which runtimes can run it (tasks.runtimes).
    format: str = "hf"


@dataclass(frozen=True)
class Technique:
    name: str
    summary: str
    config: type[BaseModel]
    run: Callable[[BuildInputs], BuildResult]
    # Devices the technique can build on and whose output runs there.
    devices: frozenset[str]
    needs_calibration: bool
    # (config, byoai.memory.PlanContext) -> byoai.memory.Footprint: its peak memory on a model of
    # that shape, and the size of what it writes (the memory plan adds these up)
    footprint: Callable[[Any, Any], Any]
    # The format of its output ("hf", "gguf", "onnx"), or a function of its config for a technique
    # that writes either; a stage whose output is not "hf" ends a chain.
    output_format: str | Callable[[Any], str] = "hf"
    # Its output holds quantized weights: a model card calls the result `quantized` from its base
    # (a pruned or distilled model is a `finetune` of it).
    quantizes: bool = True

    def output_of(self, params: dict[str, Any]) -> str:
        """The format a stage with these (validated) params writes."""
        if callable(self.output_format):
            return self.output_format(self.config.model_validate(params))
        return self.output_format


_BUILD_LOCK = threading.Lock()


def one_build_per_process() -> threading.Lock:
    """The lock every build holds: one build at a time per flow process, each in a worker process
    of its own (byoai.isolation), so llmcompressor's global session state is never shared and the
    memory plan counts one build beside the evaluations. Builds still run in parallel across
    processes (Dask, Ray); with threads, evaluations overlap with a build.
    (A function, not a global, so task runners that pickle the task by value can ship it.)
    """
    return _BUILD_LOCK


_LOADING_LOCK = threading.RLock()


def model_loading() -> threading.RLock:
    """The lock every model load holds (from_pretrained, from_config, GPTQModel.load).

    transformers builds a model inside `no_tie_weights()`, which swaps PreTrainedModel.tie_weights
    (a class attribute) for a no-op and restores it on exit. Two loads overlapping in threads can
    restore the no-op for good: every later tied model in the process then loads with a random
    lm_head (seen with the threads runner: SmolLM2 at chance level). Loads are short; the work
    between them still overlaps. (A function, like one_build_per_process, for pickling.)
    """
    return _LOADING_LOCK


def error_line(stderr: str) -> str:
    """The line of a failed tool's stderr that says what went wrong (its last error, else its last line)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")


def probe_ids(calibration_ids):
    """A fixed small input for comparing a model before and after a save/reload round trip."""
    return calibration_ids[:2, :64]


# One line per technique: the module in this package that defines TECHNIQUE.
_MODULES = (
    "baseline",
    "rtn",
    "gptq",
    "awq",
    "distill",
    "magnitude",
    "wanda",
    "sparsegpt",
    "sparse24",
    "drop_layers",
    "bnb",
    "int8_cpu",
    "gguf",
    "onnx",
    "onnx_static",
    "gguf_mixed",
    "qat",
    "autoround",
)

TECHNIQUES: dict[str, Technique] = {
    t.name: t for t in (importlib.import_module(f"{__name__}.{m}").TECHNIQUE for m in _MODULES)
}
