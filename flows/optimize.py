"""The closed loop: recipe -> variants -> evaluation of reloaded artifacts -> MLflow -> champions.

This module only orchestrates; every number is computed in a task.
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from byoai.capability import skip_reason
from byoai.recipe import Recipe, TargetProfile, VariantSpec
from byoai.runners import execution, task_runner
from byoai.settings import Settings
from byoai.summary import ResultRow, RunSummary
from tasks.build import build_variant
from tasks.data import TokensRef, prepare_calibration, prepare_perplexity_tokens
from tasks.evaluate import evaluate_artifact
from tasks.lm_eval_tasks import fingerprint
from tasks.model import ModelRef, resolve_model
from tasks.promote import Candidate, promote_champion
from tasks.report import log_report, render_markdown
from tasks.search import Search
from tasks.tracking import RunRef, finish_parent_run, log_unbuilt_run, log_variant_run, register_variant, start_parent_run


class PipelineFailed(Exception):
    """No variant x target finished: there is nothing to register or promote."""


def _error_text(state) -> tuple[str, str]:
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}", "".join(traceback.format_exception(error))
    return str(state.message), str(state.message)


def _heavy(task, name: str, device: str):
    # Tagged per device: a Prefect concurrency limit on byoai-<device> keeps one heavy job per
    # GPU / CPU worker however many the task runner would start.
    return task.with_options(task_run_name=name, tags=["byoai", f"byoai-{device}"])


@dataclass
class Loop:
    """What every variant of one flow run shares, and what the run has recorded so far."""

    recipe: Recipe
    parent: RunRef
    model: ModelRef
    calibration: TokensRef
    perplexity_tokens: TokensRef
    variants_dir: str
    reference: dict[str, Any] = field(default_factory=dict)  # target -> Metrics of the base model
    builds: dict[tuple, Any] = field(default_factory=dict)  # stage prefix -> future (shared prefixes)
    results: list[ResultRow] = field(default_factory=list)
    candidates: dict[str, list[Candidate]] = field(default_factory=lambda: defaultdict(list))

    def runnable(self, variant: VariantSpec) -> list[TargetProfile]:
        """Targets this variant can run on here; the others are recorded as skipped, with why."""
        runnable = []
        for target in self.recipe.targets:
            if (reason := skip_reason(variant, target)) is None:
                runnable.append(target)
            else:
                log_unbuilt_run(self.parent, variant, target, "skipped", reason)
                self.results.append(ResultRow(variant=variant.name, technique=variant.technique, target=target.name, status="skipped", reason=reason))
        return runnable

    def fail(self, variant: VariantSpec, target: TargetProfile, reason: str, text: str) -> None:
        log_unbuilt_run(self.parent, variant, target, "failed", reason, text)
        self.results.append(ResultRow(variant=variant.name, technique=variant.technique, target=target.name, status="failed", reason=reason))

    def submit_chain(self, variant: VariantSpec, runnable: list[TargetProfile]) -> list:
        """Submit the variant's stages; each stage's output (a future) is the next one's input."""
        device = "cuda" if any(t.device == "cuda" for t in runnable) else "cpu"
        stages, upstream = [], self.model
        for i, stage in enumerate(variant.stages):
            prefix = (device, *((s.technique, repr(sorted(s.params.items()))) for s in variant.stages[: i + 1]))
            if prefix not in self.builds:
                self.builds[prefix] = _heavy(build_variant, f"build-{variant.name}-{i}-{stage.technique}", device).submit(
                    stage.technique, stage.params, upstream, self.model, self.calibration, device, self.variants_dir
                )
            upstream = self.builds[prefix]
            stages.append(upstream)
        return stages

    def submit_evaluations(self, variant: VariantSpec, runnable: list[TargetProfile], stages: list) -> list:
        """Once its chain is built, evaluate the artifact on each target; a failed stage is recorded."""
        failed = next((i for i, future in enumerate(stages) if future.wait() or future.state.is_failed()), None)
        if failed is not None:
            where = f"stage {failed} ({variant.stages[failed].technique})" if len(variant.stages) > 1 else "build"
            message, text = _error_text(stages[failed].state)
            for target in runnable:
                self.fail(variant, target, f"{where} failed: {message}", text)
            return []
        built = [future.result() for future in stages]
        return [
            (variant, target, built, _heavy(evaluate_artifact, f"evaluate-{variant.name}@{target.name}", target.device).submit(
                built[-1], target, self.perplexity_tokens, *self.evaluation_args
            ))
            for target in runnable
        ]

    @property
    def evaluation_args(self) -> tuple:
        """The latency spec, lm-eval spec and its data fingerprint, as evaluate_artifact takes them."""
        tasks = self.recipe.evaluation.tasks
        return self.recipe.evaluation.latency, tasks, fingerprint(tasks) if tasks else None

    def record(self, variant: VariantSpec, target: TargetProfile, built: list, future, tags: dict[str, str] | None = None) -> Candidate | None:
        """Log the child run and register the version of one evaluated variant x target."""
        future.wait()
        if future.state.is_failed():
            message, text = _error_text(future.state)
            self.fail(variant, target, f"evaluation failed: {message}", text)
            return None
        metrics, reference = future.result(), self.reference[target.name]
        run_id = log_variant_run(self.parent, variant, target, built, metrics, reference, tags or {})
        version = register_variant(self.parent, self.recipe.name, self.recipe.sha(), variant, target, built[-1], run_id)
        candidate = Candidate.measured(variant.name, version.version, metrics, reference)
        self.candidates[target.name].append(candidate)
        self.results.append(ResultRow(
            variant=variant.name, technique=variant.technique, target=target.name, status="finished",
            ppl=metrics.ppl, ppl_delta_pct=candidate.ppl_delta_pct, size_mb=metrics.size_mb,
            load_s=metrics.load_s, prefill_ms=metrics.prefill_ms, decode_tok_s=metrics.decode_tok_s,
            task_scores={task: score["value"] for task, score in metrics.tasks.items()},
            version=version.version, run_id=run_id,
        ))
        return candidate

    def run_variants(self, variants: list[VariantSpec]) -> None:
        """All builds submitted at once (the task runner decides what runs in parallel), then
        evaluations as chains finish, then the records."""
        chains = [(v, runnable, self.submit_chain(v, runnable)) for v in variants if (runnable := self.runnable(v))]
        evaluations = [e for variant, runnable, stages in chains for e in self.submit_evaluations(variant, runnable, stages)]
        for variant, target, built, future in evaluations:
            self.record(variant, target, built, future)

    def run_search(self, variant: VariantSpec) -> None:
        """Trials one after another: each proposal depends on the scores of those before it."""
        search = Search(variant.search, self.recipe.promotion)
        for number in range(variant.search.trials):
            proposal = search.ask()
            if proposal is None:  # the whole grid was tried
                break
            trial, params = proposal
            trial_variant = variant.trial(number, params)
            runnable = self.runnable(trial_variant)
            if not runnable:
                break
            tags = {"byoai.search": variant.name, "byoai.trial": str(number)}
            evaluations = self.submit_evaluations(trial_variant, runnable, self.submit_chain(trial_variant, runnable))
            candidates = [self.record(v, t, built, future, tags) for v, t, built, future in evaluations]
            # scored on the first target the trial ran on
            if search.tell(trial, candidates[0] if candidates else None):
                get_run_logger().info("search %s reached stop_at after %d trials", variant.name, number + 1)
                break


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
    decisions: list[dict] = []
    rows: list[dict] = []
    status = "FAILED"
    loop = None
    try:
        model = resolve_model(recipe.model, str(settings.models_dir()))
        data_dir = str(settings.data_dir())
        loop = Loop(
            recipe=recipe, parent=parent, model=model,
            # Calibration windows are prepared even when no technique calibrates: the build step
            # probes every artifact with a few of them to check its save/reload round trip.
            calibration=prepare_calibration(recipe.calibration, model, data_dir),
            perplexity_tokens=prepare_perplexity_tokens(recipe.evaluation.perplexity, model, data_dir),
            variants_dir=str(settings.variants_dir()),
        )
        targets = [t for t in recipe.targets if any(skip_reason(v, t) is None for v in recipe.variants)]
        # The gate's reference: the base model, measured on each target like every variant.
        base = _heavy(build_variant, "build-reference", "cpu").submit("baseline", {}, model, model, loop.calibration, "cpu", loop.variants_dir)
        reference = {
            t.name: _heavy(evaluate_artifact, f"evaluate-reference@{t.name}", t.device).submit(base, t, loop.perplexity_tokens, *loop.evaluation_args)
            for t in targets
        }
        loop.reference = {name: future.result() for name, future in reference.items()}

        loop.run_variants([v for v in recipe.variants if v.search is None])
        for variant in recipe.variants:
            if variant.search is not None:
                loop.run_search(variant)

        for target in targets:
            decisions += promote_champion(uri, recipe.name, target.name, loop.candidates[target.name], recipe.promotion)
        if any(r.status == "finished" for r in loop.results):
            status = "FINISHED"
    finally:
        rows = [r.model_dump() for r in loop.results] if loop else []
        if rows:
            log_report(parent, recipe.name, rows, decisions)
        finish_parent_run(parent, rows, decisions, status)

    results = loop.results
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
