"""The `byoai-target` flow: what `optimize` dispatches to another target's work pool.

A worker on that pool (e.g. `cuda-h100`) resolves the model and data itself, builds the variants
that target needs on its own hardware, evaluates them there and logs each into the parent MLflow
run of the `optimize` run that dispatched it; `optimize` then promotes with every target's
candidates. Deployed per pool by `byoai deploy` (flows/deploy.py). Orchestration only.
"""

from __future__ import annotations


from prefect import flow

from byoai.recipe import Recipe
from byoai.results import SERIALIZER, result_options
from byoai.runners import execution, task_runner
from byoai.settings import Settings, remote_code_policy
from byoai.flows.measure import TargetOutcome, measure_targets
from byoai.tasks.tracking import RunRef


@flow(name="measure-targets", log_prints=False)
def measure_on_this_pool(recipe: Recipe, targets: list[str], parent: RunRef) -> TargetOutcome:
    outcome = TargetOutcome()
    measure_targets(recipe, [t for t in recipe.targets if t.name in targets], parent, outcome)
    return outcome


# Its result is how the dispatching `optimize` run gets the candidates back: persisted (under
# PREFECT_LOCAL_STORAGE_PATH, which `byoai deploy` sets to BYOAI_HOME's prefect-results; across
# machines, a shared result storage such as S3 via PREFECT_DEFAULT_RESULT_STORAGE_BLOCK).
@flow(name="byoai-target", log_prints=False, persist_result=True, result_serializer=SERIALIZER)
def byoai_target(recipe: Recipe, targets: list[str], parent: RunRef) -> TargetOutcome:
    """Deployment entrypoint: measure_on_this_pool as a subflow with the recipe's task runner."""
    settings = Settings()
    runner = task_runner(execution(recipe.execution, settings))
    configured = measure_on_this_pool.with_options(task_runner=runner, **result_options(settings.results_dir()))
    with remote_code_policy(recipe.model.trust_remote_code):
        return configured(recipe=recipe, targets=targets, parent=parent)
