"""Deploy the optimize flow for a recipe: a Prefect deployment on a work pool, on a schedule."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from byoai.recipe import Recipe
from byoai.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def deploy_recipe(recipe: Recipe, work_pool: str | None = None, cron: str | None = None, tracking_uri: str | None = None) -> UUID:
    """Create or update the deployment `byoai/<recipe name>`; return its id.

    The pool defaults to the first target's; the schedule to the recipe's `schedule`. Workers run
    the flow from this checkout (a process pool on this machine, or the same image elsewhere).
    """
    from flows.optimize import byoai_deployment

    settings = Settings()
    pool = work_pool or recipe.targets[0].work_pool
    schedule = cron or (recipe.schedule.cron if recipe.schedule else None)
    home = settings.resolved_home()
    flow = byoai_deployment.from_source(source=str(ROOT), entrypoint="flows/optimize.py:byoai_deployment")
    return flow.deploy(
        name=recipe.name,
        work_pool_name=pool,
        cron=schedule,
        parameters={"recipe": recipe.model_dump(mode="json"), "tracking_uri": settings.tracking(tracking_uri)},
        # Task results persist where `byoai run` keeps them, so a deployment run and a local run
        # of the same recipe share the cache, and a re-run after a crash resumes from them.
        job_variables={"env": {"BYOAI_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(settings.results_dir())}},
        tags=["byoai", *(t.name for t in recipe.targets)],
        description=recipe.description or f"byoai optimize for {recipe.name}",
        build=False,
        push=False,
        print_next_steps=False,
    )
