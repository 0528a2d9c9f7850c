"""Task accuracy with lm-eval (tasks/lm_eval_tasks.py) and the shipped offline tasks (recipes/lm_eval/).

Fast tests run on the tiny random-weight Llama: it is the random-model reference, so on the
shipped multiple-choice task it must score chance. Slow ones run on the real SmolLM2-135M.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from byoai.tasks.lm_eval_tasks import (
    RECOVERY_BAR,
    SHIPPED_DIR,
    LmEvalDataUnavailable,
    LmEvalError,
    LmEvalSpec,
    UnknownLmEvalTask,
    describe,
    evaluate_artifact_tasks,
    fingerprint,
    mlflow_metrics,
    random_baseline,
    recovery,
    run_lm_eval,
    shipped_tasks,
)

CLOZE = "byoai_pydoc_cloze"
PPL = "byoai_pydoc_ppl"
K = 4
CHANCE = 1 / K
# Critical chi-square value, 3 degrees of freedom (K = 4 bins), alpha = 0.01.
CHI2_3DF_99 = 11.34


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHIPPED_DIR / name).read_text().splitlines() if line.strip()]


def _chi2_uniform(values: list[int], k: int = K) -> float:
    counts = Counter(values)
    expected = len(values) / k
    return sum((counts.get(i, 0) - expected) ** 2 / expected for i in range(k))


def _chance_tolerance(n: int, sigmas: float = 3.0) -> float:
    """A know-nothing model's accuracy is Binomial(n, 1/K) / n: 3 standard deviations of it."""
    return sigmas * math.sqrt(CHANCE * (1 - CHANCE) / n)


def _cpu_target():
    from byoai.recipe import TargetProfile

    return TargetProfile(name="test-cpu", device="cpu", techniques=("baseline", "rtn"))


# ---------------------------------------------------------------- the spec
def test_spec_defaults_and_validation():
    from pydantic import ValidationError

    spec = LmEvalSpec()
    assert spec.tasks == (CLOZE,) and spec.limit is None and spec.num_fewshot == 0 and spec.batch_size == 8
    assert spec.needs_builtin() == []
    assert LmEvalSpec(tasks=(CLOZE, "hellaswag")).needs_builtin() == ["hellaswag"]
    for bad in ({"tasks": ()}, {"tasks": (CLOZE, CLOZE)}, {"tasks": ("no spaces please",)}, {"limit": 0},
                {"batch_size": 0}, {"num_fewshot": -1}, {"shots": 5}):
        with pytest.raises(ValidationError):
            LmEvalSpec.model_validate(bad)
    # What a cached evaluation keys on: the spec, the shipped files and the lm-eval version.
    assert fingerprint(spec) == fingerprint(LmEvalSpec()) != fingerprint(LmEvalSpec(limit=100))


def test_module_import_is_light():
    """The recipe validator imports this module: no lm_eval, torch or transformers at import."""
    code = ("import sys, byoai.tasks.lm_eval_tasks; "
            "print([m for m in ('lm_eval', 'torch', 'transformers', 'datasets') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"


def test_shipped_tasks_are_listed():
    found = shipped_tasks()
    assert {CLOZE, PPL} <= set(found)
    assert all(path.parent == SHIPPED_DIR for path in found.values())


# ---------------------------------------------------------------- the shipped data
def test_cloze_options_balanced():
    """No length or frequency heuristic beats chance: the guard against a misleading set."""
    rows = _rows("pydoc_cloze.jsonl")
    assert 300 <= len(rows) <= 1000
    assert len({row["id"] for row in rows}) == len(rows)
    length_ranks, freq_ranks, labels = [], [], []
    for row in rows:
        choices, answer = row["choices"], row["choices"][row["label"]]
        assert len(choices) == K and len(set(choices)) == K, row["id"]  # fixed K: chance is exactly 1/K
        assert answer == row["answer"]
        assert sum(len(c) == len(answer) for c in choices) == 1, row["id"]  # no length ties with the answer
        rank = sum(len(c) < len(answer) for c in choices)
        assert rank == row["answer_length_rank"]
        length_ranks.append(rank)
        freq_ranks.append(row["answer_frequency_rank"])
        labels.append(row["label"])
    # Ranks and positions uniform over the set, and over the first 100 (what `limit` scores).
    for values in (length_ranks, freq_ranks, labels, length_ranks[:100], freq_ranks[:100], labels[:100]):
        assert _chi2_uniform(values) < CHI2_3DF_99, Counter(values)
    # The heuristics that fooled the unbalanced set: pick the longest / shortest option.
    for pick in (max, min):
        hits = sum(pick(range(K), key=lambda i, r=row: len(r["choices"][i])) == row["label"] for row in rows)
        assert abs(hits / len(rows) - CHANCE) < _chance_tolerance(len(rows)), pick.__name__


def test_cloze_not_solved_by_token_count(tiny_model):
    """A random-weight model prefers options of fewer tokens: with the tiny BPE (trained on these
    docs, so frequent words are single tokens) that choice must score chance too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = _rows("pydoc_cloze.jsonl")

    def n_tokens(word: str) -> int:
        return len(tokenizer(" " + word, add_special_tokens=False).input_ids)

    hits = sum(min(range(K), key=lambda i, r=row: (n_tokens(r["choices"][i]), i)) == row["label"] for row in rows)
    assert abs(hits / len(rows) - CHANCE) < _chance_tolerance(len(rows))


def test_shipped_data_small_disjoint_and_rebuildable():
    files = ["pydoc_cloze.jsonl", "pydoc_cloze_dev.jsonl", "pydoc_ppl.jsonl"]
    assert sum((SHIPPED_DIR / f).stat().st_size for f in files) < 1_000_000
    test_contexts = {row["context"] for row in _rows("pydoc_cloze.jsonl")}
    dev = _rows("pydoc_cloze_dev.jsonl")
    assert dev and not test_contexts & {row["context"] for row in dev}  # few-shot examples never tested
    assert len(_rows("pydoc_ppl.jsonl")) == 16

    spec = importlib.util.spec_from_file_location("byoai_lm_eval_build_data", SHIPPED_DIR / "build_data.py")
    build_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_data)
    if build_data.source_version() != build_data.SOURCE:
        pytest.skip(f"data were built from {build_data.SOURCE}; this is {build_data.source_version()}")
    for path, text in build_data.build_files().items():
        assert path.read_text() == text, f"{path.name} is stale: run python {SHIPPED_DIR / 'build_data.py'}"


# ---------------------------------------------------------------- running on the tiny random model
@pytest.fixture(scope="module")
def tiny_scores(tiny_bench):
    """Both shipped tasks, all examples, on the tiny random model reloaded from its artifact."""
    artifact = tiny_bench.build("baseline")
    started = time.perf_counter()
    scores = evaluate_artifact_tasks(artifact.path, _cpu_target(), LmEvalSpec(tasks=(CLOZE, PPL)))
    print(f"\ntiny random model, {time.perf_counter() - started:.0f} s:\n{describe(scores)}")
    return scores


def test_scores_have_metric_value_stderr_n(tiny_scores):
    cloze, ppl = tiny_scores[CLOZE], tiny_scores[PPL]
    assert cloze["metric"] == "acc" and cloze["n"] == len(_rows("pydoc_cloze.jsonl"))
    assert 0 < cloze["stderr"] < 0.05 and cloze["higher_is_better"] and cloze["chance"] == CHANCE
    assert set(cloze["metrics"]) == {"acc,none", "acc_norm,none"}
    assert ppl["metric"] == "bits_per_byte" and ppl["n"] == 16 and not ppl["higher_is_better"]
    assert ppl["stderr"] is None and ppl["chance"] is None  # lm-eval gives no stderr for corpus-level ppl
    assert 1 < ppl["value"] < 10  # a random model over 512 tokens: about log2(512) / 2.3 bytes per token
    flat = mlflow_metrics(tiny_scores)
    assert flat[f"lm_eval.{CLOZE}.acc"] == cloze["value"] and flat[f"lm_eval.{CLOZE}.n"] == cloze["n"]
    assert f"lm_eval.{CLOZE}.acc.stderr" in flat and f"lm_eval.{PPL}.bits_per_byte.stderr" not in flat


def test_random_model_scores_chance(tiny_scores):
    """The tiny random-weight Llama knows nothing: on a well-built K-option task it scores 1/K.

    Its picks are a fixed function of each question, so on an unbiased set they are right with
    probability 1/K independently: accuracy ~ Binomial(n, 1/4) / n, sd 0.020 at n = 461; we allow
    3 sd (0.061). The first, unbalanced build of this set (frequent answers, rare distractors)
    scored 0.397 here, 7 sd off; the set in the README that misled scored 0.875.
    """
    cloze = tiny_scores[CLOZE]
    tolerance = _chance_tolerance(cloze["n"])
    assert abs(cloze["value"] - CHANCE) < tolerance, (cloze["value"], tolerance)
    assert abs(cloze["metrics"]["acc_norm,none"] - CHANCE) < tolerance


def test_limit_and_deterministic_self_recovery(tiny_bench):
    from byoai.tasks.techniques.io import load_model

    model, tokenizer = load_model(Path(tiny_bench.model.path))
    spec = LmEvalSpec(tasks=(CLOZE,), limit=16, batch_size=4)
    first, again = run_lm_eval(model, tokenizer, spec), run_lm_eval(model, tokenizer, spec)
    assert first[CLOZE]["n"] == 16
    # The same model scored twice recovers exactly 1: evaluation is deterministic.
    assert recovery(again, first) == {CLOZE: 1.0}


def test_recovery_math():
    def score(metric, value, higher=True):
        return {"metric": metric, "value": value, "stderr": None, "n": 100, "higher_is_better": higher}

    base = {"a": score("acc", 0.60), "p": score("bits_per_byte", 1.00, higher=False), "only_base": score("acc", 0.5)}
    ours = {"a": score("acc", 0.57), "p": score("bits_per_byte", 1.25, higher=False), "only_ours": score("acc", 0.5)}
    got = recovery(ours, base)
    assert got == pytest.approx({"a": 0.95, "p": 0.8})  # lower-is-better metrics invert: > 1 is better
    assert got["a"] >= RECOVERY_BAR > got["p"]
    assert math.isnan(recovery({"a": score("acc", 0.3)}, {"a": score("acc", 0.0)})["a"])
    with pytest.raises(LmEvalError, match="acc_norm"):
        recovery({"a": score("acc_norm", 0.5)}, {"a": score("acc", 0.5)})


# ---------------------------------------------------------------- tasks that cannot run here
def test_unreachable_builtin_task_names_it(tiny_bench, monkeypatch, tmp_path):
    """A built-in task offline with no cached dataset: a clear error, not a stack of hub errors."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-datasets-cache")
    from byoai.tasks.techniques.io import load_model

    model, tokenizer = load_model(Path(tiny_bench.model.path))
    with pytest.raises(LmEvalDataUnavailable) as info:
        run_lm_eval(model, tokenizer, LmEvalSpec(tasks=(CLOZE, "hellaswag"), limit=2))
    message = str(info.value)
    assert info.value.task == "hellaswag" and "'hellaswag'" in message
    assert "Hugging Face Hub" in message and "cache" in message and CLOZE in message

    with pytest.raises(UnknownLmEvalTask, match="no_such_task"):
        run_lm_eval(model, tokenizer, LmEvalSpec(tasks=("byoai_no_such_task",)))


# ---------------------------------------------------------------- the real model (slow)
SMOL_LIMIT = 64  # the first 64 questions (a fair sample: the file is in shuffled order)


@pytest.mark.slow
def test_smollm2_above_chance_and_rtn_w4_recovery(smol_bench):
    target = _cpu_target()
    spec = LmEvalSpec(tasks=(CLOZE,), limit=SMOL_LIMIT)
    started = time.perf_counter()
    base = evaluate_artifact_tasks(smol_bench.build("baseline").path, target, spec)
    base_s = time.perf_counter() - started
    acc = base[CLOZE]
    print(f"\nSmolLM2-135M, {base_s:.0f} s: {describe(base)}")
    assert acc["n"] == SMOL_LIMIT
    # Clearly above chance: > 6 sd of a guesser's accuracy above 1/4 (0.25 + 0.33 at n = 64).
    assert acc["value"] > CHANCE + 2 * _chance_tolerance(SMOL_LIMIT)

    rtn = smol_bench.build("rtn", {"bits": 4, "group_size": 64})
    started = time.perf_counter()
    quant = evaluate_artifact_tasks(rtn.path, target, spec)
    print(f"RTN W4 g64, {time.perf_counter() - started:.0f} s: {describe(quant)}")
    got = recovery(quant, base)
    print(f"recovery: {got} (bar {RECOVERY_BAR})")
    assert set(got) == {CLOZE}
    # At n = 64 one question is 1.6 points: assert only what noise cannot flip.
    assert 0.8 < got[CLOZE] < 1.2
    assert quant[CLOZE]["value"] > CHANCE + 2 * _chance_tolerance(SMOL_LIMIT)


@pytest.mark.slow
def test_random_model_with_smollm2_tokenizer_scores_chance(smollm2):
    """The random-model reference for the real model's tokenizer (49,152 tokens)."""
    scores = random_baseline(LmEvalSpec(tasks=(CLOZE,)), smollm2.path)
    print(f"\nrandom model, SmolLM2 tokenizer: {describe(scores)}")
    assert abs(scores[CLOZE]["value"] - CHANCE) < _chance_tolerance(scores[CLOZE]["n"])
