"""The Prefect task runner a recipe asks for: threads, Dask or Ray (existing engines, no home-made scheduler)."""

from __future__ import annotations

from byoai.recipe import ExecutionSpec
from byoai.settings import Settings


def execution(spec: ExecutionSpec, settings: Settings) -> ExecutionSpec:
    """The recipe's execution block with this machine's settings applied on top."""
    updates = {k: v for k, v in {"runner": settings.runner, "max_workers": settings.max_workers}.items() if v}
    return ExecutionSpec.model_validate(spec.model_dump() | updates) if updates else spec


def task_runner(spec: ExecutionSpec):
    if spec.runner == "dask":
        import dask
        from prefect_dask import DaskTaskRunner

        # byoai's tasks start worker processes of their own (byoai.isolation): Dask's worker
        # processes must not be daemonic, or Python refuses them children
        dask.config.set({"distributed.worker.daemon": False})

        if spec.address:
            return DaskTaskRunner(address=spec.address)
        # One single-threaded process per worker: torch numerics must not share a GIL-bound process.
        return DaskTaskRunner(cluster_kwargs={"n_workers": spec.max_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})
    if spec.runner == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=spec.address, init_kwargs={"num_cpus": spec.max_workers, "include_dashboard": False})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=spec.max_workers)
