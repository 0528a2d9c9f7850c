"""The closed loop: recipe -> variants -> evaluation of reloaded artifacts -> MLflow -> champions.

This module only orchestrates; every number is computed in a task.
"""

from __future__ import annotations

import signal
from collections import defaultdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from byoai import progress
from byoai.capability import skip_reason
from byoai.isolation import stop_all, workers_stopped_on_sigterm
from byoai.log import step_logger
from byoai.lifecycle import Terminated
from byoai.recipe import Recipe
from byoai.results import result_options
from byoai.runners import execution, task_runner
from byoai.settings import Settings, remote_code_policy
from byoai.summary import RunSummary
from byoai.flows.measure import TargetOutcome, complete_cards, measure_targets
from byoai.tasks.promote import promote_champion
from byoai.tasks.report import log_report, render_markdown
from byoai.tasks.tracking import RunRef, finish_parent_run, start_parent_run


class PipelineFailed(Exception):
    """No variant x target finished: there is nothing to register or promote."""


def dispatch_to_pools(dispatch: dict[str, str], recipe: Recipe, parent: RunRef) -> dict[str, tuple[list[str], Any]]:
    """Start one `byoai-target` run per deployment named in `dispatch` (target -> deployment) for
    its targets, without waiting: they run on their pools' workers while this one measures its own."""
    from prefect.deployments import run_deployment

    by_deployment: dict[str, list[str]] = defaultdict(list)
    for target in recipe.targets:
        if target.name in dispatch:
            by_deployment[dispatch[target.name]].append(target.name)
    return {
        deployment: (names, run_deployment(
            deployment, timeout=0, as_subflow=True, flow_run_name=f"{recipe.name}-on-{'-'.join(names)}",
            parameters={"recipe": recipe.model_dump(mode="json"), "targets": names, "parent": parent.model_dump()},
        ))
        for deployment, names in by_deployment.items()
    }


def collect_dispatched(started: dict[str, tuple[list[str], Any]], recipe: Recipe, parent: RunRef, outcome: TargetOutcome) -> None:
    """Wait for the dispatched runs and merge their outcomes; a run that did not complete fails
    its targets' variants (recorded in MLflow with the run's state) and the others go on."""
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + Settings().dispatch_timeout_s
    for deployment, (names, started_run) in started.items():
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(started_run.id)
            while not run.state.is_final() and time.monotonic() < deadline:
                time.sleep(2)
                run = client.read_flow_run(started_run.id)
        if run.state.is_completed():
            # read back through the API the record holds the model as JSON data: validate it again
            outcome.merge(TargetOutcome.model_validate(run.state.result()))
            continue
        reason = f"dispatched run {run.name} ({deployment}, pool {run.work_pool_name}) ended {run.state.name}: {run.state.message or ''}"
        if not run.state.is_final():
            reason = f"dispatched run {run.name} ({deployment}) did not finish within BYOAI_DISPATCH_TIMEOUT_S"
        get_run_logger().error(reason)
        for target in (t for t in recipe.targets if t.name in names):
            for variant in recipe.variants:
                outcome.unbuilt(parent, variant, target, "failed", reason)


def mark_failed_in_mlflow(flow, flow_run, state) -> None:
    """Flow hook: a failed or crashed flow run marks its MLflow parent run FAILED, with the reason.

    The flow's own `finally` does this for errors it sees; this covers crashes and cancellations
    that end the flow run from outside (a killed worker, a cancelled run).
    """
    from byoai.tasks.tracking import mark_flow_run_failed

    uri = Settings().tracking(flow_run.parameters.get("tracking_uri"))
    mark_flow_run_failed(uri, str(flow_run.id), f"{state.name}: {state.message or ''}")


# log_prints off in every flow: nothing of byoai prints, and libraries' prints are no run logs (dill,
# under datasets, disassembles functions with print(): one log record per bytecode line).
@flow(name="optimize", log_prints=False, on_failure=[mark_failed_in_mlflow], on_crashed=[mark_failed_in_mlflow], on_cancellation=[mark_failed_in_mlflow])
def optimize(recipe: Recipe, tracking_uri: str | None = None, dispatch: dict[str, str] | None = None) -> RunSummary:
    """`dispatch` (target -> `byoai-target` deployment, set by `byoai deploy`) sends those targets'
    builds and evaluations to their own work pools; the other targets are measured here."""
    settings = Settings()
    uri = settings.tracking(tracking_uri)
    # The artifact folder is ours to choose only for the default local store.
    artifact_root = str(settings.default_artifact_root()) if uri == Settings(tracking_uri=None).tracking() else None
    parent = start_parent_run(recipe, uri, artifact_root, {
        "id": str(flow_run.id or ""), "name": str(flow_run.name or ""), "root_id": str(flow_run.root_flow_run_id or ""),
    })
    progress.emit("started", detail=parent.run_id)
    decisions: list[dict] = []
    rows: list[dict] = []
    status, failure = "FAILED", None
    outcome = TargetOutcome()
    try:
        with workers_stopped_on_sigterm():
            dispatch = dispatch or {}
            started = dispatch_to_pools(dispatch, recipe, parent)
            local = [t for t in recipe.targets if t.name not in dispatch]
            if local:
                measure_targets(recipe, local, parent, outcome)
            collect_dispatched(started, recipe, parent, outcome)
            if started:
                complete_cards(recipe, parent, outcome)
            for target in recipe.targets:
                if target.name in outcome.candidates or any(skip_reason(v, target) is None for v in recipe.variants):
                    decisions += promote_champion(
                        uri, recipe.name, target.name, outcome.candidates.get(target.name, []), recipe.promotion, parent.run_id,
                        outcome.inputs.get(target.name),
                    )
            if any(r.status == "finished" for r in outcome.results):
                status = "FINISHED"
    except (Terminated, TerminationSignal) as exc:
        # SIGTERM: Prefect's engine turns it into TerminationSignal inside the flow (byoai's own
        # handler outside it): stop the workers now, record why, let the engine end the run
        stop_all()
        failure = f"terminated by signal {signal.Signals(getattr(exc, 'signal', signal.SIGTERM)).name}"
        raise
    finally:
        rows = [r.model_dump() for r in outcome.results]
        if rows:
            log_report(parent, recipe.name, rows, decisions)
        finish_parent_run(parent, rows, decisions, status, failure)

    results = outcome.results
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


def run_optimize(recipe: Recipe, tracking_uri: str | None = None, dispatch: dict[str, str] | None = None) -> RunSummary:
    """Run the flow with the recipe's task runner and task results persisted under BYOAI_HOME."""
    settings = Settings()
    # Set before the task runner starts, so its worker processes inherit the recipe's choice.
    with remote_code_policy(recipe.model.trust_remote_code):
        return optimize_for(recipe, settings)(recipe=recipe, tracking_uri=tracking_uri, dispatch=dispatch)


def optimize_for(recipe: Recipe, settings: Settings):
    """The optimize flow configured for a recipe: its task runner (no more heavy steps at once
    than the memory plan lets fit), results under BYOAI_HOME."""
    from byoai.plan import workers_that_fit_here

    spec = execution(recipe.execution, settings)
    if spec.max_workers > 1 and (fits := workers_that_fit_here(recipe, spec.max_workers)) < spec.max_workers:
        step_logger().warning("running %d heavy steps at once, not %d: more would not fit in memory (byoai plan)", fits, spec.max_workers)
        spec = spec.model_copy(update={"max_workers": fits})
    runner = task_runner(spec)
    return optimize.with_options(task_runner=runner, **result_options(settings.results_dir()))


@flow(name="byoai", log_prints=False, on_failure=[mark_failed_in_mlflow], on_crashed=[mark_failed_in_mlflow], on_cancellation=[mark_failed_in_mlflow])
def byoai_deployment(recipe: Recipe, tracking_uri: str | None = None, dispatch: dict[str, str] | None = None) -> RunSummary:
    """Deployment entrypoint: `optimize` as a subflow, with the task runner the recipe asks for
    (a deployment loads its flow from source, so options set in the caller would not reach it)."""
    return run_optimize(recipe, tracking_uri, dispatch)
