"""Deploy a recipe: the optimize flow on its pool, and a `byoai-target` flow on every other
pool its targets name, so one run measures each target on that target's own hardware."""

from __future__ import annotations

from uuid import UUID

from byoai.recipe import Recipe
from byoai.settings import Settings

def target_deployment_name(recipe: Recipe, pool: str) -> str:
    return f"{recipe.name}-on-{pool}"


def deploy_recipe(
    recipe: Recipe, work_pool: str | None = None, cron: str | None = None, tracking_uri: str | None = None
) -> tuple[UUID, dict[str, str]]:
    """Create or update the deployment `byoai/<recipe name>`; return its id and its `dispatch`
    (target -> the `byoai-target` deployment that measures it on its own pool).

    The pool defaults to the first target's; the schedule to the recipe's `schedule`. Each other
    pool named by a target gets the deployment `byoai-target/<recipe>-on-<pool>` (no schedule: the
    optimize run starts it), and the optimize deployment's `dispatch` parameter sends those
    targets there. Workers run the flows from their own install of byoai (a process pool on this
    machine, or the worker image elsewhere).
    """
    from byoai.flows.optimize import byoai_deployment
    from byoai.flows.target import byoai_target

    settings = Settings()
    pool = work_pool or recipe.targets[0].work_pool
    uri = settings.tracking(tracking_uri)
    dispatch = {}
    for other in sorted({t.work_pool for t in recipe.targets} - {pool}):
        name = target_deployment_name(recipe, other)
        _deploy(byoai_target, name, other, None, {}, recipe, settings)
        dispatch.update({t.name: f"byoai-target/{name}" for t in recipe.targets if t.work_pool == other})
    deployment_id = _deploy(
        byoai_deployment, recipe.name, pool,
        cron or (recipe.schedule.cron if recipe.schedule else None),
        {"recipe": recipe.model_dump(mode="json"), "tracking_uri": uri, "dispatch": dispatch},
        recipe, settings,
    )
    return deployment_id, dispatch


def _deploy(flow, name: str, pool: str, cron: str | None, parameters: dict, recipe: Recipe, settings: Settings) -> UUID:
    """Register the deployment. Its entrypoint is the flow's module path in the installed byoai
    (e.g. byoai.flows.optimize.byoai_deployment): a worker imports it from its own install."""
    from prefect.deployments.runner import EntrypointType

    return flow.to_deployment(
        name=name,
        work_pool_name=pool,
        cron=cron,
        parameters=parameters,
        # Task results persist where `byoai run` keeps them, so a deployment run and a local run
        # of the same recipe share the cache, and a re-run after a crash resumes from them.
        job_variables={"env": {"BYOAI_HOME": str(settings.resolved_home()), "PREFECT_LOCAL_STORAGE_PATH": str(settings.results_dir())}},
        tags=["byoai", *(t.name for t in recipe.targets)],
        description=recipe.description or f"byoai optimize for {recipe.name}",
        entrypoint_type=EntrypointType.MODULE_PATH,
    ).apply(work_pool_name=pool)
