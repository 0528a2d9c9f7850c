"""MLflow tracking and registry: one parent run per flow run, one child run per variant x target.

Always through an explicit MlflowClient (never the fluent, thread-local active-run API) so tasks
can run on any Prefect task runner.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from byoai.log import step_logger
from byoai.recipe import INPUT_VARIANT, Recipe, TargetProfile, VariantSpec
from byoai.tasks.build import Artifact
from byoai.tasks.card import CARD_FILE, registered_marker, with_measured
from byoai.tasks.techniques import REPORT_DIR
from byoai.tasks.evaluate import Metrics, ppl_delta_pct
from byoai.tasks.lm_eval_tasks import mlflow_metrics, recovery
from byoai.tasks.runtimes import RuntimeBuild

TAG = "byoai."


class RunRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    tracking_uri: str
    experiment_id: str
    run_id: str


class VersionRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    source: str
    created: bool
    # where this registration wrote the artifact's card in the run it was given ("" when the
    # version reuses another's)
    card_path: str = ""


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _experiment(mlflow, name: str, artifact_root: str | None) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = Path(artifact_root, name).as_uri() if artifact_root else None
    return mlflow.create_experiment(name, artifact_location=location, tags={f"{TAG}recipe": name})


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def start_parent_run(recipe: Recipe, tracking_uri: str, artifact_root: str | None, flow_run: dict[str, str]) -> RunRef:
    import yaml

    mlflow = client(tracking_uri)
    experiment_id = _experiment(mlflow, recipe.name, artifact_root)
    run = mlflow.create_run(
        experiment_id,
        run_name=f"{recipe.name}-{flow_run.get('name', 'local')}",
        tags={
            f"{TAG}recipe_sha": recipe.sha(),
            f"{TAG}kind": "flow",
            "prefect.flow_run_id": flow_run.get("id", ""),
            "prefect.flow_run_name": flow_run.get("name", ""),
            # the deployment's run when this flow runs as its subflow: hooks find the run by either
            "prefect.root_flow_run_id": flow_run.get("root_id", ""),
            # who runs it: `byoai runs --repair` (and the next run on this host) fail it only when
            # that process is gone
            **process_tags(),
        },
    )
    run_id = run.info.run_id
    recipe_json = recipe.model_dump(mode="json")
    mlflow.log_text(run_id, yaml.safe_dump(recipe_json, sort_keys=False), "recipe.yaml")
    _log(mlflow, run_id, params={
        "model": recipe_json["model"],
        "trust_remote_code": recipe.model.trust_remote_code,
        "calibration": recipe_json["calibration"],
        "perplexity": recipe_json["evaluation"]["perplexity"],
        "targets": [t.name for t in recipe.targets],
        "variants": [v.name for v in recipe.variants],
        "promotion": recipe_json["promotion"],
    })
    return RunRef(tracking_uri=tracking_uri, experiment_id=experiment_id, run_id=run_id)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_memory_plan(parent: RunRef, plan) -> None:
    """The memory plan as the parent run's memory-plan.json, the reference runtime per target as tags."""
    from dataclasses import asdict

    mlflow = client(parent.tracking_uri)
    rows = [asdict(row) | {"verdict": vp.skip_reason() or "fits"} for vp in plan.variants for row in vp.rows]
    if rows:
        mlflow.log_table(parent.run_id, data=_columns(rows), artifact_file="memory-plan.json")
    for target, runtime in plan.reference_runtime.items():
        mlflow.set_tag(parent.run_id, f"{TAG}reference.{target}", runtime or "none: it fits no runtime on this worker")
    mlflow.set_tag(parent.run_id, f"{TAG}model_shape", plan.shape.describe())


def process_tags() -> dict[str, str]:
    import os
    import socket

    import psutil

    return {
        f"{TAG}host": socket.gethostname(), f"{TAG}pid": str(os.getpid()),
        f"{TAG}pid_started": str(psutil.Process().create_time()),
    }


def _log(mlflow, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    mlflow.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
    )


def _child(mlflow, parent: RunRef, variant: VariantSpec, target: TargetProfile, status: str, extra_tags: dict[str, str], runtime: str = "") -> str:
    run = mlflow.create_run(
        parent.experiment_id,
        run_name=f"{variant.name}@{target.name}" + (f" [{runtime}]" if runtime else ""),
        tags={
            "mlflow.parentRunId": parent.run_id,
            f"{TAG}variant": variant.name,
            f"{TAG}technique": variant.technique,
            f"{TAG}target": target.name,
            f"{TAG}runtime": runtime,
            f"{TAG}status": status,
            **extra_tags,
        },
    )
    _log(mlflow, run.info.run_id, params={
        "technique": variant.technique,
        **{f"param.{k}": v for k, v in variant.flat_params().items()},
        "target.device": target.device,
        "target.dtype": target.dtype,
    })
    return run.info.run_id


def _runtime_params(build: RuntimeBuild) -> dict[str, Any]:
    """How the runtime that measured a run was built (flags, compiler, what the CPU build uses)."""
    return {
        "runtime": build.runtime, "runtime.build": build.key, "runtime.version": build.version,
        "runtime.flags": " ".join(build.flags), "runtime.compiler": build.compiler,
        "runtime.build_s": build.build_s, "runtime.system_info": build.system_info,
        **({"runtime.server_version": build.server_version} if build.server_version else {}),
    }


def _metrics(metrics: Metrics, reference: Metrics) -> dict[str, float]:
    return {
        "ppl": metrics.ppl,
        "ppl_delta_pct": ppl_delta_pct(metrics, reference),
        "size_mb": metrics.size_mb,
        "load_s": metrics.load_s,
        "prefill_ms": metrics.prefill_ms,
        "decode_tok_s": metrics.decode_tok_s,
        "ppl_tokens": metrics.ppl_tokens,
        **metrics.profile,
        **mlflow_metrics(metrics.tasks),
        **{f"recovery.{task}": value for task, value in recovery(metrics.tasks, reference.tasks).items()},
    }


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_variant_run(
    parent: RunRef,
    variant: VariantSpec,
    target: TargetProfile,
    stages: list[Artifact],
    metrics: Metrics,
    reference: Metrics,
    build: RuntimeBuild,
    extra_tags: dict[str, str] | None = None,
    planned: dict[str, float] | None = None,
) -> str:
    """A finished child run with each stage's facts, the runtime build, the metrics of the
    final artifact measured in that runtime, and the memory plan's estimate beside the measured peaks."""
    artifact = stages[-1]
    facts = (
        {f"fact.{k}": v for k, v in artifact.facts.items()}
        if len(stages) == 1
        else {f"stage{i}.fact.{k}": v for i, stage in enumerate(stages) for k, v in stage.facts.items()}
    )
    mlflow = client(parent.tracking_uri)
    run_id = _child(mlflow, parent, variant, target, "finished", {
        f"{TAG}artifact_sha": artifact.sha,
        f"{TAG}device": metrics.device[:5000],
        f"{TAG}format": artifact.format,
        f"{TAG}runtime_build": build.key,
        **(extra_tags or {}),
    }, build.runtime)
    _log(
        mlflow,
        run_id,
        params={"build_device": artifact.build_device, "format": artifact.format, **facts, **_runtime_params(build)},
        metrics={
            **_metrics(metrics, reference), "build_s": sum(stage.build_s for stage in stages),
            # the largest worker of the chain's builds (VmHWM / ru_maxrss of each stage's process)
            **({"build_peak_mem_mb": max(peaks)} if (peaks := [float(s.facts["peak_mem_mb"]) for s in stages if "peak_mem_mb" in s.facts]) else {}),
            **(planned or {}),
        },
    )
    report = Path(artifact.path) / REPORT_DIR
    if report.is_dir():
        mlflow.log_artifacts(run_id, str(report), artifact_path=REPORT_DIR)
    mlflow.set_terminated(run_id, "FINISHED")
    return run_id


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_input_run(parent: RunRef, target: TargetProfile, artifact: Artifact, metrics: Metrics, reference: Metrics, build: RuntimeBuild) -> str:
    """The recipe's own GGUF file measured as it is (the report's `input` row; never registered)."""
    mlflow = client(parent.tracking_uri)
    run_id = _child(mlflow, parent, INPUT_VARIANT, target, "finished", {
        f"{TAG}artifact_sha": artifact.sha, f"{TAG}format": artifact.format, f"{TAG}input": "true",
        f"{TAG}runtime_build": build.key, f"{TAG}device": metrics.device[:5000],
    }, build.runtime)
    _log(mlflow, run_id, params={**{f"fact.{k}": v for k, v in artifact.facts.items()}, **_runtime_params(build)}, metrics=_metrics(metrics, reference))
    mlflow.set_terminated(run_id, "FINISHED")
    return run_id


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_unbuilt_run(
    parent: RunRef,
    variant: VariantSpec,
    target: TargetProfile,
    status: Literal["failed", "skipped", "pruned"],
    reason: str,
    error_text: str | None = None,
    runtime: str = "",
    tags: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """A child run for a variant x target that produced no version: FAILED with the error, skipped,
    or pruned by an auto search (with the rung's numbers it was dropped on)."""
    mlflow = client(parent.tracking_uri)
    run_id = _child(mlflow, parent, variant, target, status, {f"{TAG}reason": reason[:5000], **(tags or {})}, runtime)
    if error_text:
        mlflow.log_text(run_id, error_text, "error.txt")
    if metrics:
        _log(mlflow, run_id, metrics=metrics)
    mlflow.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
    return run_id


def _ensure_registered_model(mlflow, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.create_registered_model(name, description="Variants built and evaluated by byoai.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_serving(parent: RunRef, run_id: str, served, why_not: str) -> None:
    """A candidate's serving measurement (tasks.serving.ServingMetrics) in its child run: per level
    serving.u<N>.<metric>, the same metrics stepped by users (MLflow plots them against users),
    the server's flags and each level's /metrics snapshot; or, with a serving profile and no
    measurement, why not (tag byoai.serving)."""
    import json

    from mlflow.entities import Metric, Param

    if served is None and not why_not:
        return
    mlflow = client(parent.tracking_uri)
    if served is None:
        mlflow.set_tag(run_id, f"{TAG}serving", why_not[:5000])
        return
    now = int(time.time() * 1000)
    stepped = [
        Metric(f"serving.{name}", float(getattr(level, name)), now, level.users)
        for level in served.levels for name in ("ttft_ms_p95", "itl_ms_p95", "tok_s", "requests_per_s")
    ]
    mlflow.log_batch(
        run_id, metrics=[Metric(k, v, now, 0) for k, v in served.flat().items()] + stepped,
        params=[Param("serving.slots", str(served.slots)), Param("serving.slot_context", str(served.slot_context)),
                Param("serving.server_args", " ".join(served.args)[:6000])],
        tags=[],
    )
    mlflow.set_tag(run_id, f"{TAG}serving", "measured")
    mlflow.log_text(run_id, json.dumps(served.model_dump(), indent=1), "serving/levels.json")


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def tag_version(parent: RunRef, name: str, version: str, tags: dict[str, str]) -> None:
    """More tags on a registered version (a speculative pair's draft and server flags)."""
    mlflow = client(parent.tracking_uri)
    for key, value in tags.items():
        mlflow.set_model_version_tag(name, version, key, value[:5000])


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_variant(
    parent: RunRef,
    recipe_name: str,
    recipe_sha: str,
    variant: VariantSpec,
    target: TargetProfile,
    artifact: Artifact,
    run_id: str,
    build: RuntimeBuild,
    card: str,
    description: str,
) -> VersionRef:
    """One model version per artifact x target x runtime build, ever: a re-run finds it instead of adding one.

    The model folder is uploaded once per artifact, into the child run of the first target that
    registers it, with its model card as README.md (tasks.card) and a .byoai-artifact.json that
    holds no path of this machine; the versions for other targets are registry copies of that
    version (`models:/<name>/<version>`: an MLflow server accepts a source outside a version's own
    run only in that form), and their own target's child run is tagged with them. `description`
    is the version's own (its target and runtime); promotion rewrites its decision part.
    """
    mlflow = client(parent.tracking_uri)
    _ensure_registered_model(mlflow, recipe_name)
    same_artifact = mlflow.search_model_versions(
        f"name='{recipe_name}' and tags.`{TAG}artifact_sha`='{artifact.sha}'"
    )
    for version in same_artifact:
        if version.tags.get(f"{TAG}target") == target.name and version.tags.get(f"{TAG}runtime_build") == build.key:
            mlflow.set_tag(run_id, f"{TAG}model_version", str(version.version))
            return VersionRef(name=recipe_name, version=str(version.version), source=version.source, created=False)
    from byoai.settings import Settings

    card_path = ""
    if same_artifact:
        first = min(same_artifact, key=lambda v: int(v.version))
        source, source_run = f"models:/{recipe_name}/{first.version}", None
    elif not Settings().register_copies:  # the version points at the built folder: no copy (the card beside the run)
        card_path = f"model-card/{CARD_FILE}"
        mlflow.log_text(run_id, card, card_path)
        source, source_run = Path(artifact.path).as_uri(), run_id
    else:
        # the model as it ships: a technique's report/ goes to the evaluation run instead; byoai's
        # marker and a base model's own README are replaced by what describes this artifact
        for item in sorted(Path(artifact.path).iterdir()):
            if item.is_dir() and item.name != REPORT_DIR:
                mlflow.log_artifacts(run_id, str(item), artifact_path=f"model/{item.name}")
            elif item.is_file() and not item.name.startswith(".byoai") and item.name != CARD_FILE:
                mlflow.log_artifact(run_id, str(item), artifact_path="model")
        card_path = f"model/{CARD_FILE}"
        mlflow.log_text(run_id, card, card_path)
        mlflow.log_text(run_id, registered_marker(artifact), "model/.byoai-artifact.json")
        source, source_run = f"{mlflow.get_run(run_id).info.artifact_uri}/model", run_id
    version = mlflow.create_model_version(
        recipe_name,
        source=source,
        run_id=source_run,
        tags={
            f"{TAG}variant": variant.name,
            f"{TAG}technique": variant.technique,
            f"{TAG}target": target.name,
            f"{TAG}recipe_sha": recipe_sha,
            f"{TAG}artifact_sha": artifact.sha,
            f"{TAG}run_id": run_id,  # the target's evaluation (a copy's run_id is the source's)
            f"{TAG}runtime": build.runtime,
            f"{TAG}runtime_build": build.key,
            f"{TAG}format": artifact.format,
            **({f"{TAG}quant_type": str(artifact.facts["quant_type"])} if "quant_type" in artifact.facts else {}),
        },
        description=description,
    )
    mlflow.set_tag(run_id, f"{TAG}model_version", str(version.version))
    step_logger().info("registered %s version %s (%s@%s)", recipe_name, version.version, variant.name, target.name)
    return VersionRef(name=recipe_name, version=str(version.version), source=source, created=True, card_path=card_path)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def complete_card(parent: RunRef, run_id: str, path: str, section: list[str]) -> None:
    """Replace the measured section of a registered card (`path` in run `run_id`): the dispatching
    run adds what other pools measured of the same artifact."""
    import tempfile

    mlflow = client(parent.tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        card = Path(mlflow.download_artifacts(run_id, path, folder)).read_text()
    mlflow.log_text(run_id, with_measured(card, section), path)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def finish_parent_run(parent: RunRef, results: list[dict[str, Any]], decisions: list[dict[str, Any]], status: str, failure: str | None = None) -> None:
    mlflow = client(parent.tracking_uri)
    if failure:
        mlflow.set_tag(parent.run_id, f"{TAG}failure", failure[:5000])
    if results:
        mlflow.log_table(parent.run_id, data=_columns(results), artifact_file="results.json")
    if decisions:
        mlflow.log_table(parent.run_id, data=_columns(decisions), artifact_file="promotion.json")
    mlflow.set_terminated(parent.run_id, status)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


def evaluation_run_id(version) -> str | None:
    """The child run holding a model version's metrics on its own target."""
    return version.tags.get(f"{TAG}run_id") or version.run_id


def mark_flow_run_failed(tracking_uri: str, flow_run_id: str, reason: str) -> None:
    """Mark the parent run of a Prefect flow run FAILED (used by the flow's failure hooks)."""
    mlflow = client(tracking_uri)
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    runs = [
        run
        for tag in ("prefect.flow_run_id", "prefect.root_flow_run_id")
        for run in mlflow.search_runs(experiments, f"tags.`{tag}` = '{flow_run_id}'")
    ]
    for run in runs:
        if f"{TAG}failure" not in run.data.tags:  # the flow's own reason (e.g. terminated by signal) stands
            mlflow.set_tag(run.info.run_id, f"{TAG}failure", reason[:5000])
        if run.info.status == "RUNNING":
            mlflow.set_terminated(run.info.run_id, "FAILED")
