"""`byoai auto` and the recipe's `auto` section: real builds of the embedded SmolLM2 in llama.cpp,
a real Optuna pruner, a real MLflow store and Prefect run."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from byoai.cli import app
from byoai.recipe import load_recipe
from byoai.settings import Settings
from tests.test_flow import task_states, versions


def children(client: MlflowClient, name: str) -> dict[str, dict[str, str]]:
    """variant -> the tags of its child run in the model's latest parent run."""
    experiment = client.get_experiment_by_name(name)
    parent = client.search_runs([experiment.experiment_id], "tags.`byoai.recipe_sha` != ''", order_by=["start_time DESC"], max_results=1)[0]
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["byoai.variant"]: r.data.tags | {f"metric.{k}": v for k, v in r.data.metrics.items()} for r in runs}, parent


@pytest.mark.parametrize("args, says", [
    (["embedded", "--target", "cpu-nowhere"], "--target: unknown cpu-nowhere"),
    (["embedded", "--target", "cpu-x86", "--max-size-mb", "10"], "--max-size-mb 10: no candidate can meet it; the smallest is gguf-q2_k"),
    (["no-such-folder", "--target", "cpu-x86"], "MODEL: 'no-such-folder' is not `embedded`"),
])
def test_bad_input_names_the_option_exits_2_and_writes_nothing(workdir, args, says):
    result = CliRunner().invoke(app, ["auto", *args])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split()), result.output
    assert not list(workdir.glob("*.auto.yaml"))


def test_dry_run_lists_the_candidates_and_writes_nothing(workdir):
    result = CliRunner().invoke(app, ["auto", "embedded", "--target", "cpu-x86", "--max-size-mb", "100", "--dry-run"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    # over the budget on their estimated size, or too slow without a time budget: out, with why
    assert "gguf-q8_0 │ gguf │ no │ ~143 MB estimated, over --max-size-mb 100" in out
    assert "qat-q4_0 │ qat │ no │ expensive (no --time-budget-min)" in out
    assert "gguf-q2_k │ gguf │ yes" in out and "gguf-mixed-at-budget │ gguf_mixed │ yes" in out
    # smallest (the default): the one-pass kinds by estimated size, whatever their kind; then the costlier ones
    rows = [out.index(f"{name} │") for name in ("gguf-q2_k-imatrix", "onnx-int4", "gguf-q3_k_m-imatrix", "gguf-q4_0", "gguf-mixed-at-budget")]
    assert rows == sorted(rows), out
    assert not list(workdir.glob("*.auto.yaml")) and not (workdir / ".byoai" / "mlflow.db").exists()
    # best_quality: the largest first, the mixed GGUF built to the budget before every uniform type
    result = CliRunner().invoke(app, ["auto", "embedded", "--target", "cpu-x86", "--objective", "best_quality", "--max-size-mb", "100", "--dry-run"])
    out = " ".join(result.output.split())
    rows = [out.index(f"{name} │") for name in ("gguf-mixed-at-budget", "gguf-q4_k_m-imatrix", "gguf-q4_0", "gguf-q3_k_m-imatrix", "onnx-int4")]
    assert result.exit_code == 0 and rows == sorted(rows), out


def test_auto_writes_its_recipe_prunes_at_rung_0_skips_a_redundant_twin_stops_at_the_time_budget_promotes_and_reruns_from_cache(workdir):
    command = ["auto", "embedded", "--target", "cpu-x86", "--objective", "fastest", "--max-size-mb", "95",
               "--max-ppl-increase", "10", "--time-budget-min", "0.01", "--no-register"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    path = workdir / "smollm2-135m-auto.auto.yaml"
    recipe = load_recipe(path)  # what it ran is a recipe like any other
    assert recipe.auto.time_budget_min == 0.01 and recipe.promotion.max_size_mb == 95
    names = [v.name for v in recipe.variants]
    # the one-pass kinds (the mixed GGUF among them) smallest first for fastest, a plain GGUF type
    # right after its twin with an imatrix
    assert names == ["gguf-q2_k-imatrix", "gguf-q2_k", "onnx-int4", "gguf-q3_k_m-imatrix", "gguf-q3_k_m", "gguf-q4_0",
                     "gguf-q4_k_m-imatrix", "gguf-q4_k_m", "gguf-mixed-at-budget"], names
    client = MlflowClient(Settings().tracking())
    runs, parent = children(client, "smollm2-135m-auto")
    # q2_k + imatrix (about +15 % on Python's docs) and ONNX int4 (about +60 %) fail the 10 % gate
    # on rung 0's two windows, after their short decode was ranked: measured there only
    for name in ("gguf-q2_k-imatrix", "onnx-int4"):
        assert runs[name]["byoai.reason"].startswith("pruned at rung 0 (2 windows): fails the gate on these windows"), runs[name]
        assert runs[name]["byoai.status"] == "pruned" and runs[name]["byoai.pruned"] == "true" and runs[name]["byoai.rung"] == "0"
    # the first that passes goes through every rung and is promoted
    assert runs["gguf-q3_k_m-imatrix"]["byoai.status"] == "finished", {n: runs[n]["byoai.status"] for n in names}
    assert runs["gguf-q3_k_m-imatrix"]["byoai.rung"] == "final" and runs["gguf-q3_k_m-imatrix"]["byoai.search"] == "auto"
    # its full protocol scored 6 of the 8 windows: the first 2 are rung 0's (the same ids, file and runtime)
    assert runs["gguf-q3_k_m-imatrix"]["metric.ppl_windows_reused"] == 2
    # a plain GGUF type writes the same types as its imatrix twin: once that is measured it is not even built
    for plain in ("gguf-q2_k", "gguf-q3_k_m"):
        assert runs[plain]["byoai.status"] == "skipped"
        assert runs[plain]["byoai.reason"].startswith(f"no room to improve: the same types as {plain}-imatrix")
    states = task_states(parent.data.tags["prefect.flow_run_id"])
    # a fastest rung: the short decode first, then the windows
    assert {"evaluate-gguf-q2_k-imatrix@cpu-x86-llama_cpp-rung0-speed", "evaluate-gguf-q2_k-imatrix@cpu-x86-llama_cpp-rung0"} <= set(states), states
    assert not any(n.startswith("build-gguf-q2_k-0") for n in states), states
    assert not any(n.startswith("evaluate-gguf-q2_k-imatrix@") and "-rung" not in n for n in states), states
    # the gate's reference on rung 0's windows comes from its full evaluation's per-window numbers
    assert not any(n.startswith("evaluate-reference@") and "-rung" in n for n in states), states
    assert "pruned: pruned at rung 0" in " ".join(result.output.split())
    # then the time budget stops the search
    for name in ("gguf-q4_0", "gguf-mixed-at-budget"):
        assert runs[name]["byoai.status"] == "skipped" and "auto.time_budget_min (0.01 min) reached" in runs[name]["byoai.reason"], runs[name]
    champion = client.get_model_version_by_alias("smollm2-135m-auto", "champion-cpu-x86")
    assert champion.tags["byoai.variant"] == "gguf-q3_k_m-imatrix"
    # the embedded Q4_1 file comes after the candidates, on rung 0: over the 95 MB budget (98.4 MB),
    # it cannot beat the champion and gets no full evaluation
    assert runs["input"]["byoai.status"] == "pruned" and runs["input"]["byoai.rung"] == "0", runs["input"]
    assert "the input file (not a candidate)" in runs["input"]["byoai.reason"], runs["input"]
    assert not any(n.startswith("evaluate-input@") and "-rung" not in n for n in states), states

    # the written recipe is not overwritten without --force
    before = path.read_text()
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 2 and "pass --force" in again.output and path.read_text() == before

    # re-run with byoai run: every step of what it measured is found in the cache
    rerun = CliRunner().invoke(app, ["run", str(path), "--no-register"])
    assert rerun.exit_code == 0, rerun.output
    runs, parent = children(client, "smollm2-135m-auto")
    states = task_states(parent.data.tags["prefect.flow_run_id"])
    heavy = {name: state for name, state in states.items() if name.startswith(("build", "evaluate", "prepare", "first_windows"))}
    assert len(heavy) >= 6 and set(heavy.values()) == {"Cached"}, heavy
    assert [v.version for v in versions(client, "smollm2-135m-auto")] == [champion.version]


def test_rungs_grow_and_optunas_pruner_ranks_what_passes_the_gate():
    from byoai.flows.auto_search import rung_windows
    from byoai.recipe import AutoSpec, PromotionSpec
    from byoai.tasks.evaluate import Metrics
    from byoai.tasks.search import RungSearch

    auto = AutoSpec()
    assert rung_windows(auto, 40) == [2, 10] and rung_windows(auto, 8) == [2] and rung_windows(auto, 2) == [1] and rung_windows(auto, 1) == []
    search = RungSearch(auto, PromotionSpec.model_validate({"gate": {"max_ppl_increase_pct": 5}, "objective": "smallest"}))

    def rung0(name: str, size_mb: float, delta: float) -> str | None:
        metrics = Metrics(ppl=20.0, ppl_tokens=1024, load_s=0.1, prefill_ms=0.0, decode_tok_s=0.0, device="cpu", size_mb=size_mb, runtime="llama_cpp")
        return search.report(search.start(name), 0, delta, metrics)

    assert rung0("q8_0", 145.0, 0.4) is None  # the first one has nothing to be ranked against
    assert rung0("q2_k", 60.0, 38.0).startswith("fails the gate on these windows (+38.0 % > 5 %)")
    assert rung0("q6_k", 120.0, 1.0) is None  # smaller than the best so far
    assert rung0("q6_k-copy", 150.0, 1.0) == "ranked out by successive halving"  # larger than every passing one


def test_a_candidate_that_fails_the_gate_in_full_ranks_no_later_one_out():
    from byoai.recipe import AutoSpec, PromotionSpec
    from byoai.tasks.evaluate import Metrics
    from byoai.tasks.promote import Candidate
    from byoai.tasks.search import RungSearch

    promotion = PromotionSpec.model_validate({"gate": {"max_ppl_increase_pct": 10}, "objective": "smallest"})
    search = RungSearch(AutoSpec(), promotion)

    def rung0(trial, size_mb: float, delta: float) -> str | None:
        metrics = Metrics(ppl=20.0, ppl_tokens=1024, load_s=0.1, prefill_ms=0.0, decode_tok_s=0.0, device="cpu", size_mb=size_mb, runtime="llama_cpp")
        return search.report(trial, 0, delta, metrics)

    q4_0 = search.start("q4_0")
    assert rung0(q4_0, 93.5, 6.1) is None  # within the gate on two windows ...
    search.finish(q4_0, Candidate(variant="q4_0", version="1", runtime="llama_cpp", ppl=31.0, ppl_delta_pct=12.5, size_mb=93.5, decode_tok_s=100.0))
    assert search.best is None  # ... not in full
    # without forgetting q4_0's rung value, 95.3 MB would be ranked out behind 93.5 MB
    assert rung0(search.start("q3_k_m-imatrix"), 95.3, 2.4) is None


def test_a_fastest_rung_ranks_speed_before_perplexity_and_the_input_file_must_beat_the_best_finalist():
    from byoai.recipe import AutoSpec, PromotionSpec
    from byoai.tasks.evaluate import Metrics
    from byoai.tasks.promote import Candidate
    from byoai.tasks.search import RungSearch

    search = RungSearch(AutoSpec(), PromotionSpec.model_validate({"gate": {"max_ppl_increase_pct": 5}, "objective": "fastest"}))
    rung0 = Metrics(ppl=20.9, ppl_tokens=1024, load_s=0.1, prefill_ms=0.0, decode_tok_s=93.6, device="cpu", size_mb=93.5, runtime="llama_cpp")
    q3 = search.start("q3_k_m")
    assert search.rank(q3, 0, -93.6) is None and search.report_after_rank(q3, 0, 3.0, rung0) is None
    search.finish(q3, Candidate(variant="q3_k_m", version="1", runtime="llama_cpp", ppl=28.9, ppl_delta_pct=4.6, size_mb=93.5, decode_tok_s=84.8))
    assert search.rank(search.start("q8_0"), 0, -65.0) == "ranked out by successive halving"  # its windows are never scored
    q2 = search.start("q2_k")
    assert search.rank(q2, 0, -99.7) is None  # the fastest so far ...
    assert search.report_after_rank(q2, 0, 6.8, rung0).startswith("fails the gate on these windows (+6.8 % > 5 %)")  # ... out of the gate
    # its rung value is forgotten: behind 99.7 tok/s, 95 tok/s would be ranked out
    assert search.rank(search.start("q4_0"), 0, -95.0) is None
    # the input file, measured after the search: it must beat the best finalist on the same rung
    assert search.input_loses(0, -80.0) == "is worse than q3_k_m on this rung (80.000 tok/s against 93.600)"
    assert search.input_loses(0, -96.0) is None and search.input_loses(0, -93.6) is None  # a tie is measured in full


def test_a_plain_gguf_type_is_redundant_once_its_imatrix_twin_is_measured():
    from byoai.recipe import AutoSpec, PromotionSpec, VariantSpec
    from byoai.tasks.search import RungSearch

    def gguf(name: str, **params) -> VariantSpec:
        return VariantSpec.model_validate({"name": name, "technique": "gguf", "params": params})

    search = RungSearch(AutoSpec(), PromotionSpec.model_validate({"gate": {"max_ppl_increase_pct": 5}, "objective": "fastest"}))
    plain, q3 = gguf("q4_k_m", quant_type="q4_k_m"), gguf("q3_k_m", quant_type="q3_k_m")
    assert search.room_to_improve(plain, 107.0) is None  # nothing measured yet
    search.measured(gguf("q4_k_m-imatrix", quant_type="q4_k_m", imatrix=True))
    assert search.room_to_improve(plain, 107.0).startswith("no room to improve: the same types as q4_k_m-imatrix")
    assert search.room_to_improve(q3, 95.0) is None  # other types: fastest skips nothing on size
    chained = VariantSpec.model_validate({"name": "pruned-q4_k_m", "stages": [
        {"technique": "magnitude", "params": {"sparsity": 0.5}}, {"technique": "gguf", "params": {"quant_type": "q4_k_m"}}]})
    assert search.room_to_improve(chained, 107.0) is None  # another input: another file
