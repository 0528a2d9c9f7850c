"""byoai as a service: the real stack (PostgreSQL, Prefect server, MLflow server, a process worker).

Started by `infra/stack.sh start` (make test and .ci/run do it); skipped when it is not running.
Everything is checked through the servers' APIs, and the UIs in a real browser.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from pathlib import Path

import pytest

from byoai.recipe import load_recipe

PREFECT = os.environ.get("BYOAI_STACK_PREFECT_API_URL", "")
MLFLOW = os.environ.get("BYOAI_STACK_MLFLOW_URI", "")
SCREENSHOTS = Path(os.environ.get("BYOAI_TEST_ARTIFACTS", "test-artifacts")).resolve()


def _up(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=3).status == 200
    except OSError:
        return False


pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(
        not (PREFECT and MLFLOW and _up(f"{PREFECT}/health") and _up(f"{MLFLOW}/health")),
        reason="service stack not running (infra/stack.sh start; make test starts it)",
    ),
]


@pytest.fixture
def on_stack():
    """Point Prefect at the stack's server (the session's test harness points elsewhere)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: PREFECT}):
        yield


def prefect_call(fn):
    from prefect.client.orchestration import get_client

    async def call():
        async with get_client() as client:
            return await fn(client)

    return asyncio.run(call())


def task_runs(flow_run_id):
    """Task runs of a deployment's flow run and of its `optimize` subflow run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    async def read(client):
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(child.id for child in children)]
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))

    return prefect_call(read)


def optimize_run_id(flow_run_id):
    """The `optimize` subflow run of a deployment run (its id tags the MLflow parent run)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    children = prefect_call(lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))))
    assert len(children) == 1
    return children[0].id


def mlflow():
    from mlflow import MlflowClient

    return MlflowClient(MLFLOW, MLFLOW)


def deploy_and_run(recipe_path: Path):
    from prefect.deployments import run_deployment

    from byoai.flows.deploy import deploy_recipe

    recipe = load_recipe(recipe_path)
    deploy_recipe(recipe, tracking_uri=MLFLOW)
    return recipe, run_deployment(f"byoai/{recipe.name}", timeout=900, poll_interval=2)


def unique(name: str) -> str:
    return f"{name}-{int(time.time() * 1000) % 10**9}"


def test_scheduled_deployment_runs_on_a_worker(write_recipe, on_stack):
    name = unique("stack")
    path = write_recipe(
        name=name,
        targets="[cpu-x86]",
        variants="[{name: baseline, technique: baseline}, {name: rtn-w4-g32, technique: rtn, params: {group_size: 32}}]",
    )
    path.write_text(path.read_text() + 'schedule: {cron: "0 3 * * 1", timezone: "UTC"}\n')
    recipe, flow_run = deploy_and_run(path)
    assert flow_run.state.name == "Completed", flow_run.state.message

    deployment = prefect_call(lambda c: c.read_deployment_by_name(f"byoai/{name}"))
    assert deployment.work_pool_name == "cpu"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
    states = {run.name: run.state.name for run in task_runs(flow_run.id)}
    assert states["build-rtn-w4-g32-0-rtn"] == "Completed"
    assert any(k.startswith("promote_champion") for k in states)
    assert set(states.values()) <= {"Completed", "Cached"}, states  # baseline variant = reference build

    client = mlflow()
    parent = client.search_runs([client.get_experiment_by_name(name).experiment_id], f"tags.`prefect.flow_run_id` = '{optimize_run_id(flow_run.id)}'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = client.search_runs([parent[0].info.experiment_id], f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
    assert sorted(r.data.tags["byoai.variant"] for r in children) == ["baseline", "rtn-w4-g32"]
    champion = client.get_model_version_by_alias(name, "champion-cpu-x86")
    assert champion.tags["byoai.variant"] == "rtn-w4-g32"
    # artifacts went through the MLflow server (served artifacts), not to a local path
    assert champion.source.startswith("mlflow-artifacts:")
    browse_uis(flow_run, name, str(champion.version))


def test_a_target_on_another_pool_is_measured_by_that_pools_worker(write_recipe, on_stack, tmp_path):
    """`byoai deploy` gives the cpu-lab target's pool its own `byoai-target` deployment; the
    optimize run dispatches that target there and promotes with what its worker measured; the
    artifact's card holds what both pools measured."""
    import subprocess
    import sys

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    name = unique("dispatch")
    path = write_recipe(name=name, targets="[cpu-x86, cpu-lab]", variants="[{name: rtn-w4-g32, technique: rtn, params: {group_size: 32}}]")
    (path.parent / "targets").mkdir(exist_ok=True)
    (path.parent / "targets" / "cpu-lab.yaml").write_text("name: cpu-lab\ndevice: cpu\nwork_pool: cpu-lab\ntechniques: [baseline, rtn]\n")
    from prefect.client.schemas.actions import WorkPoolCreate

    prefect_call(lambda c: c.create_work_pool(WorkPoolCreate(name="cpu-lab", type="process"), overwrite=True))
    root = Path(__file__).resolve().parent.parent
    log = (path.parent / "worker-cpu-lab.log").open("w")
    worker = subprocess.Popen(  # the stack runs a worker for pool cpu only: this is the lab machine's
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu-lab", "--type", "process"],
        cwd=root, env={**os.environ, "PREFECT_API_URL": PREFECT}, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _, flow_run = deploy_and_run(path)
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:  # session 14: once > 30 s to shut down on a loaded 2-core machine
            worker.kill()
            worker.wait()
    assert flow_run.state.name == "Completed", flow_run.state.message

    main = prefect_call(lambda c: c.read_deployment_by_name(f"byoai/{name}"))
    lab = prefect_call(lambda c: c.read_deployment_by_name(f"byoai-target/{name}-on-cpu-lab"))
    assert (main.work_pool_name, lab.work_pool_name) == ("cpu", "cpu-lab")
    assert main.parameters["dispatch"] == {"cpu-lab": f"byoai-target/{name}-on-cpu-lab"}
    [dispatched] = prefect_call(lambda c: c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[lab.id]))))
    assert dispatched.state.name == "Completed" and dispatched.work_pool_name == "cpu-lab"
    on_lab = {r.name for r in task_runs(dispatched.id)}
    here = {r.name for r in task_runs(flow_run.id)}
    assert {"evaluate-reference@cpu-lab-transformers", "evaluate-rtn-w4-g32@cpu-lab-transformers"} <= on_lab
    assert "evaluate-rtn-w4-g32@cpu-x86-transformers" in here and not any("@cpu-lab" in n for n in here)

    # one MLflow parent run holds both targets' child runs; each target has its champion
    client = mlflow()
    [parent] = client.search_runs([client.get_experiment_by_name(name).experiment_id], f"tags.`prefect.flow_run_id` = '{optimize_run_id(flow_run.id)}'")
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["byoai.target"] for r in children) == ["cpu-lab", "cpu-x86"]
    by_target = {r.data.tags["byoai.target"]: r.info.run_id for r in children}
    champions = [client.get_model_version_by_alias(name, f"champion-{target}") for target in ("cpu-x86", "cpu-lab")]
    for target, champion in zip(("cpu-x86", "cpu-lab"), champions):
        assert champion.tags["byoai.variant"] == "rtn-w4-g32"
        assert champion.tags["byoai.run_id"] == by_target[target]  # its own target's metrics
    # the same artifact is uploaded once; the other target's version is a registry copy of it
    assert sorted(c.source.split(":")[0] for c in champions) == ["mlflow-artifacts", "models"]
    # whichever pool registered it first, its card ends with both targets' measurements
    [uploaded] = [c for c in champions if c.source.startswith("mlflow-artifacts")]
    card = Path(client.download_artifacts(uploaded.run_id, "model/README.md", str(tmp_path))).read_text()
    measured = card.split("## Measured in this run")[1]
    assert "| cpu-x86 | transformers |" in measured and "| cpu-lab | transformers |" in measured, measured


def http_status(url: str, body: dict | None = None, auth: str | None = None) -> int:
    """Status of a JSON request (POST with a body, else GET), with HTTP basic auth if given."""
    import base64
    import json
    import urllib.error

    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_servers_refuse_anonymous_requests_and_a_viewer_cannot_move_a_champion(on_stack, tmp_path):
    import uuid

    from mlflow import MlflowClient

    api = f"{MLFLOW}/api/2.0/mlflow"
    worker = f"worker:{os.environ['MLFLOW_TRACKING_PASSWORD']}"
    viewer = f"viewer:{os.environ['BYOAI_MLFLOW_VIEWER_PASSWORD']}"
    # anonymous: refused by both servers (their health probes stay open)
    assert http_status(f"{api}/experiments/search", {"max_results": 1}) == 401
    assert http_status(f"{PREFECT}/flow_runs/filter", {}) == 401
    assert http_status(f"{PREFECT}/flow_runs/filter", {}, auth="nobody:wrong") == 401
    assert http_status(f"{PREFECT}/flow_runs/filter", {}, auth=os.environ["PREFECT_API_AUTH_STRING"]) == 200
    # the worker registers a model version (the client reads its credentials from the environment)
    name = f"auth-check-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(MLFLOW, MLFLOW)
    run = client.create_run(client.create_experiment(name))
    (tmp_path / "weights.txt").write_text("w")
    client.log_artifact(run.info.run_id, str(tmp_path / "weights.txt"), "model")
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    alias = {"name": name, "alias": "champion-cpu-x86", "version": str(version.version)}
    # the viewer reads it but may not choose what ships; the worker may
    assert http_status(f"{api}/registered-models/get?name={name}", auth=viewer) == 200
    assert http_status(f"{api}/registered-models/alias", alias, auth=viewer) == 403
    assert http_status(f"{api}/registered-models/alias", alias) == 401
    assert http_status(f"{api}/registered-models/alias", alias, auth=worker) == 200


def browse_uis(flow_run, model_name: str, champion: str) -> None:
    """Both UIs in Debian's Chromium, driven by Playwright: the run, its tasks, the champion alias,
    and the champion version's description (what it is, and since which run it is champion)."""
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ui = PREFECT.removesuffix("/api")
    run_id = optimize_run_id(flow_run.id)  # before the browser: Playwright's sync API runs its own event loop
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        # the MLflow UI asks for basic-auth credentials (the read-only user's); the Prefect UI
        # shows its login page, where the auth string goes
        context = browser.new_context(
            viewport={"width": 1400, "height": 1000},
            http_credentials={"username": "viewer", "password": os.environ["BYOAI_MLFLOW_VIEWER_PASSWORD"]},
        )
        page = context.new_page()
        page.goto(ui)
        page.locator("input[type=password]").first.fill(os.environ["PREFECT_API_AUTH_STRING"], timeout=60_000)
        page.keyboard.press("Enter")
        page.wait_for_function("() => window.localStorage.getItem('prefect-password') !== null", timeout=60_000)
        page.goto(f"{ui}/runs/flow-run/{run_id}")
        page.get_by_text("optimize").first.wait_for(timeout=60_000)
        page.get_by_text("Completed").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SCREENSHOTS / "prefect-flow-run.png"), full_page=True)
        page.get_by_text("Task Runs", exact=True).first.click()
        page.get_by_text("build-rtn-w4-g32-0-rtn").first.wait_for(timeout=60_000)
        page.get_by_text("evaluate-rtn-w4-g32@cpu-x86").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SCREENSHOTS / "prefect-task-runs.png"), full_page=True)

        page.goto(f"{MLFLOW}/#/models/{model_name}")
        page.get_by_text("champion-cpu-x86").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow-registered-model.png"), full_page=True)
        page.goto(f"{MLFLOW}/#/models/{model_name}/versions/{champion}")
        page.get_by_text("rtn-w4-g32 (rtn) on cpu-x86").first.wait_for(timeout=60_000)
        page.get_by_text("since run").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow-model-version.png"), full_page=True)
        browser.close()


def test_a_cancelled_run_resumes_from_persisted_results(write_recipe, on_stack):
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from byoai.flows.deploy import deploy_recipe

    name = unique("resume")
    path = write_recipe(
        name=name,
        targets="[cpu-x86]",
        variants="""
  - {name: rtn-w4-g32, technique: rtn, params: {group_size: 32}}
  - {name: slow-distill, stages: [{technique: rtn, params: {bits: 8, group_size: 32}}, {technique: distill, params: {steps: 4000, batch_size: 8}}]}""",
    )
    (path.parent / "targets").mkdir(exist_ok=True)
    (path.parent / "targets" / "cpu-x86.yaml").write_text("name: cpu-x86\ndevice: cpu\ntechniques: [baseline, rtn, distill]\n")
    recipe = load_recipe(path)
    deploy_recipe(recipe, tracking_uri=MLFLOW)
    first = run_deployment(f"byoai/{name}", timeout=0)

    # cancel the run during the slow distillation, once the other builds have finished
    deadline = time.time() + 600
    while time.time() < deadline:
        states = {r.name: r.state.name for r in task_runs(first.id)}
        if states.get("build-rtn-w4-g32-0-rtn") == "Completed" and states.get("build-slow-distill-1-distill") == "Running":
            break
        time.sleep(1)
    else:
        pytest.fail(f"the distillation never started: {states}")
    prefect_call(lambda c: c.set_flow_run_state(first.id, Cancelling(), force=True))
    while prefect_call(lambda c: c.read_flow_run(first.id)).state.type not in {StateType.CANCELLED, StateType.CRASHED, StateType.FAILED}:
        time.sleep(1)
    # ~11 ms a step on an idle 2-core CPU: 4000 steps outlast the worker's cancellation by minutes
    killed = {r.name: r.state.name for r in task_runs(first.id)}["build-slow-distill-1-distill"]
    assert killed != "Completed", "the distillation finished before the cancellation landed: make it longer"

    client = mlflow()
    parent = client.search_runs([client.get_experiment_by_name(name).experiment_id], f"tags.`prefect.flow_run_id` = '{optimize_run_id(first.id)}'")[0]
    assert parent.info.status == "FAILED" and "byoai.failure" in parent.data.tags  # the flow hook
    assert client.search_model_versions(f"name='{name}'") == []

    # the re-run finds every finished step in the persisted results: nothing recomputed
    second = run_deployment(f"byoai/{name}", timeout=900, poll_interval=2)
    assert second.state.name == "Completed", second.state.message
    states = {r.name: r.state.name for r in task_runs(second.id)}
    assert states["build-rtn-w4-g32-0-rtn"] == "Cached"
    assert states["build-slow-distill-0-rtn"] == "Cached"
    assert states["build-slow-distill-1-distill"] == "Completed"  # the step that was killed
    after = sorted(v.tags["byoai.variant"] for v in client.search_model_versions(f"name='{name}'"))
    assert after == ["rtn-w4-g32", "slow-distill"]
    # and a third run adds nothing: every version is found again, not duplicated
    third = run_deployment(f"byoai/{name}", timeout=900, poll_interval=2)
    assert third.state.name == "Completed"
    assert sorted(v.tags["byoai.variant"] for v in client.search_model_versions(f"name='{name}'")) == after
