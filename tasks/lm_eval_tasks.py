"""Task accuracy with lm-eval: shipped offline tasks (recipes/lm_eval/) or any lm-eval built-in.

    spec = LmEvalSpec(tasks=("byoai_pydoc_cloze",), limit=200)
    base = run_lm_eval(base_model, tokenizer, spec)       # {task: {metric, value, stderr, n, ...}}
    ours = run_lm_eval(variant_model, tokenizer, spec)
    recovery(ours, base)                                  # {task: variant / baseline}, bar: >= 0.95

The model is one already loaded (for byoai: the artifact reloaded from disk, `load_artifact`);
lm-eval wraps it in HFLM and scores it with `simple_evaluate`. Shipped tasks read their data from
files beside their YAML and never touch the network. A built-in task downloads its dataset from
the Hugging Face Hub on first use: offline (HF_HUB_OFFLINE=1) it works only from a populated
datasets cache, and fails with LmEvalDataUnavailable otherwise.

Shipped tasks (see recipes/lm_eval/build_data.py):
- byoai_pydoc_cloze: 461 four-option next-word questions on Python's reference-manual prose;
  chance 0.25; answer length and corpus frequency ranks balanced, so a know-nothing model scores
  chance (tests/test_lm_eval.py measures that with a random-weight model).
- byoai_pydoc_ppl: rolling log-likelihood of 16 documents; bits per byte (lower is better).

Heavy imports (lm_eval, torch, transformers) stay inside functions: the recipe validator imports
this module for LmEvalSpec alone.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from byoai.recipes import RECIPES_DIR
from byoai.settings import hf_load_kwargs

SHIPPED_DIR = RECIPES_DIR / "lm_eval"
DEFAULT_TASKS = ("byoai_pydoc_cloze",)
# llm-compressor's CI passes a compressed model when it keeps >= 95 % of the base model's score.
RECOVERY_BAR = 0.95
# Only metrics without a closed-form standard error are bootstrapped (lm-eval's default: 100,000).
BOOTSTRAP_ITERS = 1000
# Main metric of a built-in task that does not name one: the first of these it reports.
_PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "mcc", "bits_per_byte", "word_perplexity", "perplexity")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


class LmEvalError(Exception):
    """An lm-eval evaluation that cannot run as asked; str() says what to change."""


class UnknownLmEvalTask(LmEvalError):
    """A task name that is neither shipped with byoai nor an lm-eval built-in."""


class LmEvalDataUnavailable(LmEvalError):
    """A built-in task whose dataset is neither reachable (offline) nor in the datasets cache."""

    def __init__(self, task: str, dataset: str | None, cause: BaseException):
        self.task, self.dataset, self.cause = task, dataset, cause
        where = f"dataset '{dataset}'" if dataset else "its dataset"
        super().__init__(
            f"lm-eval task '{task}' needs {where} from the Hugging Face Hub, which cannot be reached here "
            f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set, or no network) and is not in the datasets cache: "
            f"run it once where the hub is reachable to populate the cache (HF_HOME / HF_DATASETS_CACHE), "
            f"or use a task shipped with byoai ({', '.join(sorted(shipped_tasks()))}). "
            f"Cause: {type(cause).__name__}: {str(cause)[:300]}"
        )


class LmEvalSpec(BaseModel):
    """Which lm-eval tasks to score each variant on, and how many examples of each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Shipped task names (recipes/lm_eval/) or any lm-eval built-in name (needs its dataset cached).
    tasks: tuple[str, ...] = DEFAULT_TASKS
    # Examples per task (the first N of the test split); None scores all of them.
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int = Field(default=0, ge=0, le=32)
    batch_size: int = Field(default=8, ge=1, le=1024)

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"give at least one task, e.g. {list(DEFAULT_TASKS)}")
        bad = [name for name in value if not _TASK_NAME.match(name)]
        if bad:
            raise ValueError(f"{bad}: not lm-eval task names")
        dupes = sorted({name for name in value if value.count(name) > 1})
        if dupes:
            raise ValueError(f"duplicate task(s) {dupes}")
        return value

    def needs_builtin(self) -> list[str]:
        """Requested tasks that are not shipped: lm-eval built-ins, whose data may need the hub."""
        shipped = shipped_tasks()
        return [name for name in self.tasks if name not in shipped]


def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML file of every task in recipes/lm_eval/ (read without importing lm-eval)."""
    found = {}
    for path in sorted(SHIPPED_DIR.glob("*.yaml")):
        match = re.search(r"^task:\s*([^\s#]+)", path.read_text(), flags=re.MULTILINE)
        if match:
            found[match.group(1).strip("'\"")] = path
    return found


def fingerprint(spec: LmEvalSpec) -> str:
    """Identifies what a score depends on besides the model: the spec, the shipped task files and
    the lm-eval version. Pass it to a cached evaluation step so edited data invalidate old scores."""
    import hashlib
    from importlib.metadata import version

    digest = hashlib.sha256(spec.model_dump_json().encode())
    digest.update(version("lm_eval").encode())
    for path in sorted(SHIPPED_DIR.iterdir()):
        if path.suffix in {".yaml", ".jsonl", ".py"} and path.name != "build_data.py":
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- running
def _task_manager(spec: LmEvalSpec):
    # Indexing lm-eval's built-in task YAML files costs ~10 s: only when a built-in is asked for.
    return _cached_task_manager(bool(spec.needs_builtin()))


@functools.lru_cache(maxsize=2)
def _cached_task_manager(include_defaults: bool):
    """The task index, built once per process (each `load` still builds fresh task objects)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(SHIPPED_DIR), include_defaults=include_defaults)


def _load_tasks(spec: LmEvalSpec, manager) -> list:
    """Build every requested task (this is where lm-eval loads datasets); map failures to names."""
    shipped = shipped_tasks()
    loaded = []
    for name in spec.tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise UnknownLmEvalTask(
                f"'{name}' is not an lm-eval task: shipped ones are {sorted(shipped)}, "
                f"built-ins are listed by `lm-eval ls tasks`{hint}"
            )
        try:
            built = manager.load([name])
        except Exception as exc:  # noqa: BLE001 - re-raised with the task named
            if name in shipped or not _is_data_error(exc):
                raise
            entry = manager.task_index.get(name)
            dataset = (entry.cfg or {}).get("dataset_path") if entry is not None else None
            raise LmEvalDataUnavailable(name, dataset, exc) from exc
        if name in built["groups"]:
            loaded.append(built["groups"][name])
        else:  # a task, or a tag standing for several tasks
            loaded.extend(built["tasks"].values())
    return loaded


def _is_data_error(exc: BaseException) -> bool:
    """A dataset that cannot be fetched: network/offline errors from datasets or huggingface_hub."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        module = type(exc).__module__ or ""
        if isinstance(exc, ConnectionError | OSError | TimeoutError) or module.startswith(
            ("datasets", "huggingface_hub", "requests", "httpx", "urllib3")
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def run_lm_eval(model, tokenizer, spec: LmEvalSpec, *, max_length: int | None = None) -> dict[str, dict]:
    """Score an already-loaded causal LM on the spec's tasks.

    Returns, per task (and per group, for group names), the main metric:
    {"metric", "value", "stderr" (None when lm-eval gives none), "n" (examples scored),
     "higher_is_better", "chance" (shipped multiple-choice tasks; else None), "metrics" (all)}.
    """
    from lm_eval.models.huggingface import HFLM

    return score_lm(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, max_length=max_length), spec)


def score_lm(lm, spec: LmEvalSpec) -> dict[str, dict]:
    """Score an lm-eval LM (HFLM, LogitsLM, ...) on the spec's tasks; the same result form as run_lm_eval."""
    from lm_eval import simple_evaluate

    manager = _task_manager(spec)
    loaded = _load_tasks(spec, manager)
    results = simple_evaluate(
        model=lm,
        tasks=loaded,
        task_manager=manager,
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=False,
    )
    return _scores(results)


def LogitsLM(logprobs, tokenizer, max_length: int = 2048):
    """An lm-eval LM over any runtime that gives log-probabilities of a token sequence.

    lm-eval's TemplateLM does the request handling; tokenization mirrors HFLM's (same tokenizer,
    same special-token rules, same prefix token, same rolling windows), so a runtime's scores are
    comparable with transformers' on the same task. `logprobs(ids) -> [len(ids), vocab]`.
    """
    import torch
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

    class _LogitsLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer
            self.max_length = max_length

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            special = _add_special_kwargs(add_special_tokens, None)
            if add_special_tokens is None and has_bos_prefix(string, tokenizer.decode(self.prefix_token_id)):
                special["add_special_tokens"] = False
            return tokenizer.encode(string, **special)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            out = []
            for _, context, continuation in requests:
                ids = (context + continuation)[-(self.max_length + 1):][:-1]
                rows = logprobs(ids)[-len(continuation):]
                targets = torch.tensor(continuation)
                out.append((float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            scores = []
            for (text,) in (request.args for request in requests):
                windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1,
                ))
                scores.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
            return scores

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            raise LmEvalError("generation tasks are not measured in this runtime yet: use loglikelihood tasks (e.g. byoai_pydoc_cloze)")

    return _LogitsLM()


def _scores(results: dict) -> dict[str, dict]:
    out = {}
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})
    for task, row in results["results"].items():
        config = results.get("configs", {}).get(task, {})
        metadata = config.get("metadata") or {}
        values = {
            key: float(value)
            for key, value in row.items()
            if "," in key and "_stderr," not in key and isinstance(value, int | float)
        }
        if not values:
            continue
        metric_key = _main_metric(values, metadata.get("main_metric"))
        metric, _, filt = metric_key.partition(",")
        stderr = row.get(f"{metric}_stderr,{filt}")
        leaves = _leaves(task, subtasks) or [task]
        n = sum(int(n_samples.get(leaf, {}).get("effective", 0)) for leaf in leaves)
        higher = results.get("higher_is_better", {}).get(task, {}).get(metric)
        out[task] = {
            "metric": metric if filt == "none" else metric_key,
            "value": values[metric_key],
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "n": n,
            "higher_is_better": True if higher is None else bool(higher),
            "chance": metadata.get("chance"),
            "metrics": values,
        }
    return out


def _main_metric(values: dict[str, float], named: str | None) -> str:
    """'metric,filter' key: the task's own main_metric, else the first preferred one it reports."""
    for wanted in ([named] if named else []) + list(_PREFERRED):
        keys = [key for key in values if key.partition(",")[0] == wanted]
        if keys:
            return next((key for key in keys if key.endswith(",none")), keys[0])
    return next(iter(values))


def _leaves(name: str, subtasks: dict[str, list[str]]) -> list[str]:
    out = []
    for child in subtasks.get(name, []):
        out += _leaves(child, subtasks) if child in subtasks else [child]
    return out


def recovery(variant_scores: dict[str, dict], baseline_scores: dict[str, dict]) -> dict[str, float]:
    """Per task: the variant's main metric relative to the baseline's, 1.0 = fully recovered.

    variant / baseline for higher-is-better metrics (accuracy), baseline / variant for
    lower-is-better ones (perplexity, bits per byte), so > 1 always means better than the base.
    Tasks scored in only one of the two are left out; NaN where the baseline scored 0.
    Compare against RECOVERY_BAR (0.95). Accuracy recovery is only meaningful when the baseline
    is well above chance: near chance, noise dominates the ratio.
    """
    out = {}
    for task in sorted(set(variant_scores) & set(baseline_scores)):
        ours, base = variant_scores[task], baseline_scores[task]
        if ours["metric"] != base["metric"]:
            raise LmEvalError(f"{task}: variant scored on {ours['metric']}, baseline on {base['metric']}")
        num, den = (ours["value"], base["value"]) if base["higher_is_better"] else (base["value"], ours["value"])
        out[task] = num / den if den else math.nan
    return out


def mlflow_metrics(scores: dict[str, dict], prefix: str = "lm_eval") -> dict[str, float]:
    """Flat MLflow metric names: `lm_eval.<task>.<metric>`, plus `.stderr` and `.n`."""
    out = {}
    for task, score in scores.items():
        name = f"{prefix}.{task}.{score['metric'].replace(',', '.')}"
        out[name] = score["value"]
        if score["stderr"] is not None:
            out[f"{name}.stderr"] = score["stderr"]
        out[f"{prefix}.{task}.n"] = float(score["n"])
    return out


# ---------------------------------------------------------------- byoai artifacts and references
def evaluate_artifact_tasks(path: str | Path, target, spec: LmEvalSpec) -> dict[str, dict]:
    """run_lm_eval on an artifact folder reloaded the way the target loads it (tasks.evaluate)."""
    from transformers import AutoTokenizer

    from byoai.tasks.runtimes.transformers import load_artifact

    model, _ = load_artifact(str(path), target.device, target.dtype)
    return run_lm_eval(model, AutoTokenizer.from_pretrained(path, **hf_load_kwargs()), spec)


def random_baseline(spec: LmEvalSpec, tokenizer_dir: str | Path, seed: int = 0) -> dict[str, dict]:
    """What a model that knows nothing scores on the spec's tasks with this tokenizer.

    A 2-layer random-weight Llama over the tokenizer's vocabulary: on a well-built
    multiple-choice task it lands at chance (1/K); well above chance means the task leaks its
    answers through option length or word frequency (a tokenizer artifact), not knowledge.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **hf_load_kwargs())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    return run_lm_eval(model, tokenizer, spec)


def describe(scores: dict[str, dict]) -> str:
    """One line per task: `task: metric 0.612 ± 0.023 (n=461, chance 0.25)`."""
    lines = []
    for task, s in scores.items():
        err = f" ± {s['stderr']:.3f}" if s["stderr"] is not None else ""
        chance = f", chance {s['chance']}" if s.get("chance") is not None else ""
        lines.append(f"{task}: {s['metric']} {s['value']:.4g}{err} (n={s['n']}{chance})")
    return "\n".join(lines)
