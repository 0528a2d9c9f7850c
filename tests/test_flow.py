"""The closed loop on a tiny model: real Prefect runs, a real MLflow store, real quantization."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from byoai.cli import app
from byoai.recipe import load_recipe
from byoai.flows.optimize import PipelineFailed, run_optimize

runner = CliRunner()
HAS_CUDA = torch.cuda.is_available()


def mlflow_client(workdir: Path) -> MlflowClient:
    uri = f"sqlite:///{workdir / '.byoai' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(client: MlflowClient, name: str):
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def task_states(flow_run_id: str) -> dict[str, str]:
    """Task run name -> final state name, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {run.name: run.state.name for run in runs}

    return asyncio.run(read())


def test_closed_loop_registers_evaluates_and_promotes(write_recipe, workdir):
    recipe = load_recipe(write_recipe())
    summary = run_optimize(recipe)
    client = mlflow_client(workdir)

    # every variant x target has a result row; the CUDA target is skipped, with its reason, on a CPU worker
    rows = {(r.variant, r.target): r for r in summary.results}
    assert len(rows) == 6
    for variant in ("baseline", "rtn-w4-g32", "gptq-w4-g32"):
        assert rows[variant, "cpu-x86"].status == "finished"
        if not HAS_CUDA:
            assert rows[variant, "cuda-h100"].status == "skipped"
            assert "needs a CUDA GPU" in rows[variant, "cuda-h100"].reason
    base, rtn, gptq = (rows[v, "cpu-x86"] for v in ("baseline", "rtn-w4-g32", "gptq-w4-g32"))
    assert base.ppl_delta_pct == 0
    # W4 with group 32 stores ~4.5 bits per quantized weight; the tiny model's embeddings stay fp32
    assert gptq.size_mb < 0.8 * base.size_mb and rtn.size_mb == pytest.approx(gptq.size_mb, rel=0.01)
    for row in (base, rtn, gptq):
        assert row.ppl > 1 and row.load_s > 0 and row.prefill_ms > 0 and row.decode_tok_s > 0

    # MLflow: a parent run with the recipe, one child per variant x target
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["byoai.recipe_sha"] == recipe.sha()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"recipe.yaml", "results.json", "promotion.json"} <= artifacts
    children = client.search_runs([summary.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 6
    finished = [r for r in children if r.data.tags["byoai.status"] == "finished"]
    assert len(finished) == 3
    for run in finished:
        assert {"ppl", "ppl_delta_pct", "size_mb", "load_s", "prefill_ms", "decode_tok_s"} <= set(run.data.metrics)
        # the performance profile: TTFT per prompt length, decode per batch, memory and its bound
        m = run.data.metrics
        assert {"ttft_ms.p8", "ttft_ms.p16", "ttft_ms.p32", "decode_tok_s.b2", "tpot_ms.b2", "peak_mem_mb", "weights_mb"} <= set(m)
        assert m["ttft_ms.p16.min"] <= m["ttft_ms.p16"] <= m["ttft_ms.p16.max"] and m["prefill_ms"] == m["ttft_ms.p16"]
        assert m["bandwidth_gb_s"] > 0.1 and m["decode_tok_s"] < m["decode_bound_tok_s"]
        assert "Intel" in run.data.tags["byoai.device"] or "threads" in run.data.tags["byoai.device"]
    gptq_run = client.get_run(gptq.run_id)
    assert gptq_run.data.params["param.group_size"] == "32"
    assert gptq_run.data.metrics["ppl"] == pytest.approx(gptq.ppl)
    assert {a.path for a in client.list_artifacts(gptq.run_id, "model")} >= {"model/config.json", "model/model.safetensors"}

    # registry: a version per finished variant x target, tagged; the champion is the gated smallest
    registered = versions(client, "tiny")
    assert len(registered) == 3
    for version in registered:
        assert {"byoai.variant", "byoai.technique", "byoai.target", "byoai.recipe_sha", "byoai.artifact_sha"} <= set(version.tags)
        assert version.tags["byoai.target"] == "cpu-x86"
    champion = client.get_model_version_by_alias("tiny", "champion-cpu-x86")
    winner = min((r for r in (rtn, gptq) if r.ppl_delta_pct <= 50), key=lambda r: (round(r.size_mb, 3), r.ppl))
    assert str(champion.version) == winner.version
    assert summary.champions == {"cpu-x86": winner.version, "cuda-h100": None if not HAS_CUDA else summary.champions["cuda-h100"]}
    decisions = json.loads(Path(client.download_artifacts(parent.info.run_id, "promotion.json")).read_text())
    assert set(decisions["columns"]) >= {"target", "variant", "version", "gate", "champion", "reason"}
    # every version says what it is; promotion wrote whether it is champion, and since which run
    assert champion.description.startswith(f"**{champion.tags['byoai.variant']}**") and f"since run `{parent.info.run_id}`" in champion.description
    others = [v for v in registered if v.version != champion.version]
    assert all("This version is not champion-cpu-x86." in client.get_model_version("tiny", v.version).description for v in others)
    # the registered folder carries its model card
    card = Path(client.download_artifacts(gptq.run_id, "model/README.md")).read_text()
    assert "library_name: transformers" in card and "base_model:" not in card  # a local folder has no hub id
    assert "| stage 0 | `gptq` (" in card and "from_pretrained" in card and "8 windows of 64 tokens (seed 0)" in card
    assert "| cpu-x86 | transformers |" in card
    # the baseline is the unchanged base model in the reference's runtime and dtype: its
    # evaluation is the reference's, found in the cache, not a second measurement
    first = task_states(parent.data.tags["prefect.flow_run_id"])
    assert first["evaluate-reference@cpu-x86-transformers"] == "Completed" and first["evaluate-baseline@cpu-x86-transformers"] == "Cached"

    # the registered artifact reloads and generates
    from transformers import AutoModelForCausalLM

    local = client.download_artifacts(gptq.run_id, "model")
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model(torch.tensor([[1, 5, 9]])).logits.shape[-1] == model.config.vocab_size

    # a re-run of the unchanged recipe recomputes nothing and registers nothing new
    again = run_optimize(recipe)
    assert [v.version for v in versions(client, "tiny")] == [v.version for v in registered]
    assert {r.version for r in again.results if r.version} == {r.version for r in summary.results if r.version}
    assert client.get_model_version_by_alias("tiny", "champion-cpu-x86").version == champion.version
    states = task_states(client.get_run(again.parent_run_id).data.tags["prefect.flow_run_id"])
    heavy = {name: state for name, state in states.items() if name.startswith(("build", "evaluate", "prepare"))}
    assert len(heavy) >= 8 and set(heavy.values()) == {"Cached"}, heavy


def test_a_crashing_variant_is_recorded_and_the_others_go_on(write_recipe, workdir):
    recipe = load_recipe(write_recipe(
        targets="[cpu-x86]",
        variants="[{name: rtn-w4-g32, technique: rtn, params: {group_size: 32}}, {name: gptq-g48, technique: gptq, params: {group_size: 48}}]",
    ))
    summary = run_optimize(recipe)
    client = mlflow_client(workdir)
    rows = {r.variant: r for r in summary.results}
    assert rows["rtn-w4-g32"].status == "finished"
    failed = rows["gptq-g48"]
    assert failed.status == "failed"
    assert "group_size 48 does not divide the input width 64 of layer 'model.layers.0.self_attn.q_proj'" in failed.reason
    runs = client.search_runs([summary.experiment_id], "tags.`byoai.variant` = 'gptq-g48'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "params.ignore" in runs[0].data.tags["byoai.reason"]
    error = Path(client.download_artifacts(runs[0].info.run_id, "error.txt")).read_text()
    assert "TechniqueError" in error
    assert [v.tags["byoai.variant"] for v in versions(client, "tiny")] == ["rtn-w4-g32"]
    assert client.get_model_version_by_alias("tiny", "champion-cpu-x86").tags["byoai.variant"] == "rtn-w4-g32"


def test_ignore_lets_an_indivisible_layer_stay_in_full_precision(write_recipe):
    # 48 divides no layer of the tiny model; keeping all but the MLP's down projection ...
    ignore = "['lm_head', 're:.*self_attn.*', 're:.*mlp.(gate|up)_proj']"
    recipe = load_recipe(write_recipe(
        targets="[cpu-x86]",
        variants=f"[{{name: rtn-g64-some, technique: rtn, params: {{group_size: 64, ignore: {ignore}}}}}]",
    ))
    summary = run_optimize(recipe)
    row = summary.results[0]
    assert row.status == "finished"
    facts = mlflow_client(Path.cwd()).get_run(row.run_id).data.params
    assert facts["fact.quantized_layers"] == "2"  # the two down_proj layers (input width 128)


def test_every_variant_failing_fails_the_flow_and_registers_nothing(write_recipe, workdir):
    path = write_recipe(targets="[cpu-x86]", variants="[{name: bad, technique: rtn, params: {group_size: 48}}]")
    with pytest.raises(PipelineFailed, match="bad@cpu-x86"):
        run_optimize(load_recipe(path))
    client = mlflow_client(workdir)
    assert versions(client, "tiny") == []
    parent = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.`byoai.kind` = 'flow'")
    assert parent[0].info.status == "FAILED"
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 1 and "pipeline failed" in result.output


def test_champion_moves_only_for_a_strict_win(write_recipe, workdir):
    small = write_recipe(targets="[cpu-x86]", variants="[{name: rtn-w4-g32, technique: rtn, params: {group_size: 32}}]")
    first = run_optimize(load_recipe(small))
    champion = first.champions["cpu-x86"]
    # the same registered model, now only offered the (larger) base model: the champion stays
    bigger = write_recipe(targets="[cpu-x86]", variants="[{name: baseline, technique: baseline}]")
    second = run_optimize(load_recipe(bigger))
    client = mlflow_client(workdir)
    assert str(client.get_model_version_by_alias("tiny", "champion-cpu-x86").version) == champion
    kept = [d for d in second.decisions if d["variant"] == "baseline"][0]
    assert not kept["champion"] and "does not beat champion" in kept["reason"]


def test_cli_run_prints_the_table_and_champions(write_recipe, workdir):
    path = write_recipe(targets="[cpu-x86]", variants="[{name: rtn-w4-g32, technique: rtn, params: {group_size: 32}}]")
    result = runner.invoke(app, ["run", str(path), "--tracking-uri", f"sqlite:///{workdir / 'elsewhere.db'}"])
    assert result.exit_code == 0, result.output
    assert "rtn-w4-g32" in result.output and "champion-cpu-x86: version 1" in result.output
    assert "mlflow ui --backend-store-uri sqlite:///" in result.output
    assert (workdir / "elsewhere.db").is_file()
    shown = runner.invoke(app, ["champions", "tiny", "--tracking-uri", f"sqlite:///{workdir / 'elsewhere.db'}"])
    assert shown.exit_code == 0 and "champion-cpu-x86" in shown.output and "rtn-w4-g32" in shown.output
    missing = runner.invoke(app, ["champions", "nope", "--tracking-uri", f"sqlite:///{workdir / 'elsewhere.db'}"])
    assert missing.exit_code == 2 and "no registered model 'nope'" in missing.output


def test_chains_share_their_prefix_and_unlisted_techniques_are_skipped(write_recipe, workdir):
    (workdir / "targets").mkdir()
    (workdir / "targets" / "cpu-lab.yaml").write_text("name: cpu-lab\ndevice: cpu\ntechniques: [baseline, rtn, gptq]\n")
    recipe = load_recipe(write_recipe(
        targets="[cpu-lab]",
        variants="""
  - {name: r8-g4, stages: [{technique: rtn, params: {bits: 8, group_size: 32}}, {technique: gptq, params: {bits: 4, group_size: 32}}]}
  - {name: r8-r4, stages: [{technique: rtn, params: {bits: 8, group_size: 32}}, {technique: rtn, params: {bits: 4, group_size: 32}}]}
  - {name: r8-distill, stages: [{technique: rtn, params: {bits: 8, group_size: 32}}, {technique: distill, params: {steps: 2}}]}""",
    ))
    summary = run_optimize(recipe)
    rows = {r.variant: r for r in summary.results}
    assert rows["r8-g4"].status == rows["r8-r4"].status == "finished"
    assert rows["r8-distill"].status == "skipped"
    assert rows["r8-distill"].reason == "target cpu-lab does not list technique distill (its profile's `techniques`)"
    assert rows["r8-g4"].technique == "rtn+gptq"

    client = mlflow_client(workdir)
    run = client.get_run(rows["r8-g4"].run_id)
    assert run.data.params["param.stage0.technique"] == "rtn" and run.data.params["param.stage1.bits"] == "4"
    assert "stage0.fact.reload_rel_err" in run.data.params and "stage1.fact.quantized_layers" in run.data.params
    # the shared first stage was built once, for both chains; each second stage on its own
    states = task_states(client.get_run(summary.parent_run_id).data.tags["prefect.flow_run_id"])
    assert states["build-r8-g4-0-rtn"] == "Completed" and "build-r8-r4-0-rtn" not in states
    assert states["build-r8-g4-1-gptq"] == states["build-r8-r4-1-rtn"] == "Completed"
    assert not any(name.startswith("build-r8-distill") for name in states)


@pytest.mark.parametrize("runner", ["threads", "dask", "ray"])
def test_parallel_runners_land_in_one_parent_run(write_recipe, workdir, runner):
    variants = """
  - {name: rtn-w4-g32, technique: rtn, params: {group_size: 32}}
  - {name: rtn-w8-g32, technique: rtn, params: {bits: 8, group_size: 32}}
  - {name: broken, stages: [{technique: rtn, params: {group_size: 48}}, {technique: gptq, params: {group_size: 32}}]}"""
    recipe = load_recipe(write_recipe(targets="[cpu-x86]", variants=variants, execution=f"{{runner: {runner}, max_workers: 2}}"))
    summary = run_optimize(recipe)
    rows = {r.variant: r for r in summary.results}
    assert rows["rtn-w4-g32"].status == rows["rtn-w8-g32"].status == "finished"
    # a chain whose first stage fails reports that stage, and its second stage never runs
    assert rows["broken"].status == "failed" and rows["broken"].reason.startswith("stage 0 (rtn) failed: TechniqueError: group_size 48")
    client = mlflow_client(workdir)
    children = client.search_runs([summary.experiment_id], f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    assert sorted(r.data.tags["byoai.variant"] for r in children) == ["broken", "rtn-w4-g32", "rtn-w8-g32"]
    assert summary.champions["cpu-x86"] == rows["rtn-w4-g32"].version


def test_search_runs_seeded_trials_as_child_runs(write_recipe, workdir):
    recipe = load_recipe(write_recipe(
        targets="[cpu-x86]",
        variants="""
  - {name: rtn-g64, technique: rtn, params: {bits: 4, group_size: 64}}
  - name: rtn-search
    technique: rtn
    params: {bits: 4}
    search: {space: {group_size: [16, 32, 64], bits: [4, 8]}, trials: 4, metric: ppl}""",
        promotion="{gate: {max_ppl_increase_pct: 50}, objective: best_quality}",
    ))
    summary = run_optimize(recipe)
    trials = [r for r in summary.results if r.variant.startswith("rtn-search-t")]
    assert [r.variant for r in trials] == ["rtn-search-t0", "rtn-search-t1", "rtn-search-t2", "rtn-search-t3"]
    assert all(r.status == "finished" for r in trials)
    # the report's note says which parameters each trial tried
    assert all(r.reason.startswith(f"trial {i} of rtn-search: group_size=") and "bits=" in r.reason for i, r in enumerate(trials))
    client = mlflow_client(workdir)
    runs = client.search_runs([summary.experiment_id], "tags.`byoai.search` = 'rtn-search'")
    assert len(runs) == 4 and {r.data.tags["byoai.trial"] for r in runs} == {"0", "1", "2", "3"}
    tried = {(r.data.params["param.group_size"], r.data.params["param.bits"]) for r in runs}
    assert len(tried) == 4  # a grid is walked without repeats
    # the same search again replays the same seeded proposals, all from cache
    again = run_optimize(recipe)
    assert [r.version for r in again.results] == [r.version for r in summary.results]


def test_search_stops_when_the_goal_is_reached(write_recipe):
    recipe = load_recipe(write_recipe(
        targets="[cpu-x86]",
        variants="[{name: s, technique: rtn, search: {space: {group_size: [16, 32, 64]}, trials: 3, metric: ppl, stop_at: 1e9}}]",
    ))
    summary = run_optimize(recipe)
    assert [r.variant for r in summary.results] == ["s-t0"]  # any finished trial meets stop_at


def test_search_walks_a_whole_grid_and_then_stops_asking():
    from byoai.recipe import PromotionSpec, SearchSpec
    from byoai.tasks.promote import Candidate
    from byoai.tasks.search import Search

    search = Search(SearchSpec(space={"group_size": [32, 64, 192]}, trials=5, metric="ppl"), PromotionSpec())
    tried = []
    while (proposal := search.ask()) is not None:
        trial, params = proposal
        tried.append(params["group_size"])
        # telling the last point of the grid must not raise (Optuna's grid samplers stop the study)
        search.tell(trial, Candidate(variant="v", version="1", ppl=10.0 + len(tried), ppl_delta_pct=1.0, size_mb=1.0, decode_tok_s=1.0))
    assert sorted(tried) == [32, 64, 192]
    assert search.best == 11.0


def test_search_space_is_validated_at_the_door(write_recipe):
    from byoai.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"search.space.group_sz: not a parameter of rtn"):
        load_recipe(write_recipe(variants="[{name: s, technique: rtn, search: {space: {group_sz: [32]}}}]"))
    with pytest.raises(RecipeError, match=r"search.space.bits: 5 is not valid"):
        load_recipe(write_recipe(variants="[{name: s, technique: rtn, search: {space: {bits: [4, 5]}}}]"))


def test_lm_eval_tasks_are_scored_and_gated_in_the_loop(write_recipe, workdir):
    # The shipped offline cloze task (recipes/lm_eval), 32 questions: the tiny random model is
    # near chance, so its recovery ratios are noise; a bar of 2.0 (twice the base score) must fail.
    recipe = load_recipe(write_recipe(
        targets="[cpu-x86]",
        variants="[{name: rtn-w8-g32, technique: rtn, params: {bits: 8, group_size: 32}}]",
        evaluation="""
  perplexity: {source: {kind: builtin, split: test}, max_tokens: 512, seq_len: 128}
  latency: {prompt_tokens: 16, new_tokens: 4, warmup: 0, repeats: 1}
  tasks: {tasks: [byoai_pydoc_cloze], limit: 32}""",
        promotion="{gate: {max_ppl_increase_pct: 50, min_task_recovery: 2.0}}",
    ))
    summary = run_optimize(recipe)
    row = summary.results[0]
    assert 0 <= row.task_scores["byoai_pydoc_cloze"] <= 1
    metrics = mlflow_client(workdir).get_run(row.run_id).data.metrics
    assert metrics["lm_eval.byoai_pydoc_cloze.n"] == 32 and "recovery.byoai_pydoc_cloze" in metrics
    decision = summary.decisions[0]
    assert decision["gate"] == "fail" and "task recovery byoai_pydoc_cloze" in decision["reason"]
    assert summary.champions["cpu-x86"] is None
