"""The closed loop: recipe -> variants -> evaluation of reloaded artifacts -> MLflow -> champions.

This module only orchestrates; every number is computed in a task.
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from byoai.capability import skip_reason
from byoai.recipe import Recipe
from byoai.runners import execution, task_runner
from byoai.settings import Settings
from byoai.summary import ResultRow, RunSummary
from tasks.build import build_variant
from tasks.data import prepare_calibration, prepare_perplexity_tokens
from tasks.evaluate import evaluate_artifact
from tasks.model import resolve_model
from tasks.promote import Candidate, promote_champion
from tasks.report import log_report, render_markdown
from tasks.tracking import finish_parent_run, log_unbuilt_run, log_variant_run, register_variant, start_parent_run


class PipelineFailed(Exception):
    """No variant x target finished: there is nothing to register or promote."""


def _error_text(state) -> tuple[str, str]:
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}", "".join(traceback.format_exception(error))
    return str(state.message), str(state.message)


def mark_failed_in_mlflow(flow, flow_run, state) -> None:
    """Flow hook: a failed or crashed flow run marks its MLflow parent run FAILED, with the reason.

    The flow's own `finally` does this for errors it sees; this covers crashes and cancellations
    that end the flow run from outside (a killed worker, a cancelled run).
    """
    from tasks.tracking import mark_flow_run_failed

    uri = Settings().tracking(flow_run.parameters.get("tracking_uri"))
    mark_flow_run_failed(uri, str(flow_run.id), f"{state.name}: {state.message or ''}")


@flow(name="optimize", log_prints=True, on_failure=[mark_failed_in_mlflow], on_crashed=[mark_failed_in_mlflow], on_cancellation=[mark_failed_in_mlflow])
def optimize(recipe: Recipe, tracking_uri: str | None = None) -> RunSummary:
    settings = Settings()
    uri = settings.tracking(tracking_uri)
    # The artifact folder is ours to choose only for the default local store.
    artifact_root = str(settings.default_artifact_root()) if uri == Settings(tracking_uri=None).tracking() else None
    parent = start_parent_run(recipe, uri, artifact_root, {
        "id": str(flow_run.id or ""), "name": str(flow_run.name or ""), "root_id": str(flow_run.root_flow_run_id or ""),
    })
    results: list[ResultRow] = []
    decisions: list[dict] = []
    status = "FAILED"
    try:
        model = resolve_model(recipe.model, str(settings.models_dir()))
        plan = {(v.name, t.name): skip_reason(v, t) for v in recipe.variants for t in recipe.targets}
        targets = [t for t in recipe.targets if any(plan[v.name, t.name] is None for v in recipe.variants)]
        data_dir = str(settings.data_dir())
        # Calibration windows are prepared even when no technique calibrates: the build step
        # probes every artifact with a few of them to check its save/reload round trip.
        calibration = prepare_calibration(recipe.calibration, model, data_dir)
        perplexity_tokens = prepare_perplexity_tokens(recipe.evaluation.perplexity, model, data_dir)
        latency = recipe.evaluation.latency
        variants_dir = str(settings.variants_dir())

        def heavy(task, name: str, device: str):
            # Tagged per device: a Prefect concurrency limit on byoai-<device> keeps one heavy job
            # per GPU / CPU worker however many the task runner would start.
            return task.with_options(task_run_name=name, tags=["byoai", f"byoai-{device}"])

        # Submit the work; the task runner (recipe `execution`) decides what runs in parallel.
        # The gate's reference is the base model, measured on each target like every variant.
        base = heavy(build_variant, "build-reference", "cpu").submit("baseline", {}, model, model, calibration, "cpu", variants_dir)
        reference = {
            t.name: heavy(evaluate_artifact, f"evaluate-reference@{t.name}", t.device).submit(base, t, perplexity_tokens, latency)
            for t in targets
        }
        builds: dict[tuple, object] = {}  # stage prefix -> future: variants sharing a prefix build it once
        chains = []
        for variant in recipe.variants:
            runnable = [t for t in recipe.targets if plan[variant.name, t.name] is None]
            for target in recipe.targets:
                if (reason := plan[variant.name, target.name]) is not None:
                    log_unbuilt_run(parent, variant, target, "skipped", reason)
                    results.append(ResultRow(variant=variant.name, technique=variant.technique, target=target.name, status="skipped", reason=reason))
            if not runnable:
                continue
            device = "cuda" if any(t.device == "cuda" for t in runnable) else "cpu"
            # A chain: each stage's output (a future) is the next stage's input.
            stages, upstream = [], model
            for i, stage in enumerate(variant.stages):
                prefix = (device, *((s.technique, repr(sorted(s.params.items()))) for s in variant.stages[: i + 1]))
                if prefix not in builds:
                    builds[prefix] = heavy(build_variant, f"build-{variant.name}-{i}-{stage.technique}", device).submit(
                        stage.technique, stage.params, upstream, model, calibration, device, variants_dir
                    )
                upstream = builds[prefix]
                stages.append(upstream)
            chains.append((variant, runnable, stages))

        # As each chain finishes, evaluate its artifact on each target.
        evaluations = []
        for variant, runnable, stages in chains:
            failed = next((i for i, future in enumerate(stages) if future.wait() or future.state.is_failed()), None)
            if failed is not None:
                where = f"stage {failed} ({variant.stages[failed].technique})" if len(variant.stages) > 1 else "build"
                message, text = _error_text(stages[failed].state)
                for target in runnable:
                    log_unbuilt_run(parent, variant, target, "failed", f"{where} failed: {message}", text)
                    results.append(ResultRow(variant=variant.name, technique=variant.technique, target=target.name, status="failed", reason=f"{where} failed: {message}"))
                continue
            built = [future.result() for future in stages]
            for target in runnable:
                future = heavy(evaluate_artifact, f"evaluate-{variant.name}@{target.name}", target.device).submit(
                    built[-1], target, perplexity_tokens, latency
                )
                evaluations.append((variant, target, built, future))

        reference = {name: future.result() for name, future in reference.items()}
        candidates: dict[str, list[Candidate]] = defaultdict(list)
        for variant, target, built, future in evaluations:
            future.wait()
            if future.state.is_failed():
                message, text = _error_text(future.state)
                log_unbuilt_run(parent, variant, target, "failed", f"evaluation failed: {message}", text)
                results.append(ResultRow(variant=variant.name, technique=variant.technique, target=target.name, status="failed", reason=f"evaluation failed: {message}"))
                continue
            metrics = future.result()
            run_id = log_variant_run(parent, variant, target, built, metrics, reference[target.name])
            version = register_variant(parent, recipe.name, recipe.sha(), variant, target, built[-1], run_id)
            candidate = Candidate.measured(variant.name, version.version, metrics, reference[target.name])
            candidates[target.name].append(candidate)
            results.append(ResultRow(
                variant=variant.name, technique=variant.technique, target=target.name, status="finished",
                ppl=metrics.ppl, ppl_delta_pct=candidate.ppl_delta_pct, size_mb=metrics.size_mb,
                load_s=metrics.load_s, prefill_ms=metrics.prefill_ms, decode_tok_s=metrics.decode_tok_s,
                version=version.version, run_id=run_id,
            ))

        for target in targets:
            decisions += promote_champion(uri, recipe.name, target.name, candidates[target.name], recipe.promotion)
        if any(r.status == "finished" for r in results):
            status = "FINISHED"
    finally:
        rows = [r.model_dump() for r in results]
        if results:
            log_report(parent, recipe.name, rows, decisions)
        finish_parent_run(parent, rows, decisions, status)

    champions = {d["target"]: d["version"] for d in decisions if d["champion"]}
    summary = RunSummary(
        model_name=recipe.name, tracking_uri=uri, experiment_id=parent.experiment_id, parent_run_id=parent.run_id,
        results=results, decisions=decisions, champions={t.name: champions.get(t.name) for t in recipe.targets},
    )
    create_markdown_artifact(
        key="byoai-summary", markdown=render_markdown(recipe.name, rows, decisions), description="variants x targets"
    )
    if status != "FINISHED":
        failures = "; ".join(f"{r.variant}@{r.target}: {r.reason}" for r in results) or "no variant ran"
        raise PipelineFailed(f"no variant x target finished ({failures})")
    get_run_logger().info("champions: %s (MLflow run %s)", summary.champions, parent.run_id)
    return summary


def run_optimize(recipe: Recipe, tracking_uri: str | None = None) -> RunSummary:
    """Run the flow with the recipe's task runner and task results persisted under BYOAI_HOME."""
    settings = Settings()
    return optimize_for(recipe, settings)(recipe=recipe, tracking_uri=tracking_uri)


def optimize_for(recipe: Recipe, settings: Settings):
    """The optimize flow configured for a recipe: its task runner, results under BYOAI_HOME."""
    runner = task_runner(execution(recipe.execution, settings))
    return optimize.with_options(task_runner=runner, result_storage=Path(settings.results_dir()))


@flow(name="byoai", log_prints=True, on_failure=[mark_failed_in_mlflow], on_crashed=[mark_failed_in_mlflow], on_cancellation=[mark_failed_in_mlflow])
def byoai_deployment(recipe: Recipe, tracking_uri: str | None = None) -> RunSummary:
    """Deployment entrypoint: `optimize` as a subflow, with the task runner the recipe asks for
    (a deployment loads its flow from source, so options set in the caller would not reach it)."""
    return run_optimize(recipe, tracking_uri)
