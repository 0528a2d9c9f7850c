"""The `byoai` command: run, validate, champions. Exit codes: 0 ok, 1 pipeline failure, 2 bad input."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from byoai.recipe import RecipeError, load_recipe

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Compress one LLM into the best variant per hardware target.")
# Wide enough for the results table when output goes to a file or CI log, not a terminal.
console = Console(width=None if Console().is_terminal else 180)
err = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 180)

TrackingUri = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite under ./.byoai)"),
]


def _load(recipe: Path, data: bool = False):
    """The validated recipe; with `data`, its text sources are checked too (byoai.preflight)."""
    try:
        parsed = load_recipe(recipe)
    except RecipeError as exc:
        err.print(f"[bold red]invalid recipe[/]\n{exc}", highlight=False)
        raise typer.Exit(2) from None
    if data:
        from byoai.preflight import data_problems

        if problems := data_problems(parsed):
            lines = "\n".join(f"  {p}" for p in problems)
            err.print(f"[bold red]invalid recipe[/]\n{recipe.resolve()}: invalid ({len(problems)} error{'s' * (len(problems) > 1)})\n{lines}", highlight=False)
            raise typer.Exit(2)
    return parsed


@app.command()
def validate(recipe: Path) -> None:
    """Check a recipe, its target profiles, model files and texts without running anything; print its memory plan."""
    parsed = _load(recipe, data=True)
    console.print(
        f"[green]ok[/] {parsed.name}: {len(parsed.variants)} variant(s) x {len(parsed.targets)} target(s) "
        f"({', '.join(t.name for t in parsed.targets)}); recipe sha {parsed.sha()[:12]}"
    )
    _print_plan(parsed, parsed.targets, None)


@app.command()
def plan(
    recipe: Path,
    target: Annotated[list[str] | None, typer.Option("--target", help="plan these targets (default: the recipe's); any shipped or recipe-folder profile")] = None,
    model_config: Annotated[Path | None, typer.Option("--model-config", help="a model's config.json: plan that model, no weights needed")] = None,
) -> None:
    """Print each variant x target x runtime's peak memory, without loading any weight."""
    from byoai.recipe import RecipeError, available_targets, load_target

    parsed = _load(recipe)
    targets = list(parsed.targets)
    if target:
        known = available_targets(recipe.resolve().parent)
        unknown = [t for t in target if t not in known]
        if unknown:
            err.print(f"[bold red]unknown target(s)[/] {unknown}; allowed: {', '.join(sorted(known))}", highlight=False)
            raise typer.Exit(2)
        try:
            targets = [load_target(known[t]) for t in target]
        except RecipeError as exc:
            err.print(f"[bold red]invalid target[/]\n{exc}", highlight=False)
            raise typer.Exit(2) from None
    if model_config is not None and not model_config.is_file():
        err.print(f"[bold red]--model-config {model_config}:[/] file not found; give a model's config.json", highlight=False)
        raise typer.Exit(2)
    _print_plan(parsed, targets, model_config)


def _print_plan(parsed, targets, model_config: Path | None) -> None:
    from byoai.plan import capacity_of, model_shape, plan_memory, plan_table_rows

    try:
        shape = model_shape(parsed, model_config)
    except (OSError, ValueError, KeyError) as exc:
        err.print(f"[bold red]cannot read the model's shape:[/] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(2) from None
    memory = plan_memory(parsed, shape, targets, capacity_of, parsed.execution.max_workers)
    table = Table(title=f"memory plan: {shape.describe()}")
    for column in ("variant", "target", "step", "runtime", "host RAM", "GPU", "why", "verdict"):
        table.add_column(column, overflow="fold")
    for row in plan_table_rows(memory):
        table.add_row(*row)
    console.print(table)
    for t in targets:
        room = capacity_of(t)
        device = f", GPU {room.device / 1e9:.1f} GB" if room.device is not None else ""
        console.print(f"{t.name}: {room.source} has {room.host / 1e9:.1f} GB host RAM{device}; reference in {memory.reference_runtime.get(t.name) or 'nowhere (it fits no runtime)'}", highlight=False)
    for note in memory.notes:
        console.print(note, highlight=False)


@app.command()
def run(
    recipe: Path,
    tracking_uri: TrackingUri = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream the libraries' logs to the terminal too")] = False,
    no_register: Annotated[bool, typer.Option("--no-register", help="registered versions point at the built folders instead of copying them into the MLflow store")] = False,
) -> None:
    """Build, evaluate, register every variant and promote a champion per target."""
    from byoai.settings import environment

    with environment(**({"BYOAI_REGISTER_COPIES": "false"} if no_register else {})):
        _run(recipe, tracking_uri, verbose)


def _run(recipe: Path, tracking_uri: str | None, verbose: bool) -> None:
    import contextlib

    from byoai.console import Reporter, log_path, output_to, terminal_stream
    from byoai.settings import Settings

    parsed = _load(recipe, data=True)
    settings = Settings()
    log_file = log_path(settings.resolved_home(), parsed.name)
    term = Console(file=terminal_stream(), width=None if console.is_terminal else 180)
    from byoai.flows.optimize import run_optimize
    from prefect.exceptions import TerminationSignal

    from byoai.lifecycle import Terminated, repair_stale_runs, temporary_prefect_server, terminate_on_sigterm

    uri = settings.tracking(tracking_uri)
    reporter = Reporter(term)
    summary, code = None, 1
    try:
        with reporter.showing(), (contextlib.nullcontext() if verbose else output_to(log_file)):
            # what an earlier run that died left behind (the store's own chatter goes to the log)
            for run_id, reason in repair_stale_runs(uri):
                term.print(f"marked MLflow run {run_id} FAILED: {reason}", highlight=False)
            with temporary_prefect_server(settings.resolved_home()), terminate_on_sigterm():
                summary = run_optimize(parsed, tracking_uri)
    except (Terminated, TerminationSignal):
        term.print("[bold red]stopped:[/] terminated by signal SIGTERM; finished steps are cached for the next run", highlight=False)
        code = 128 + signal.SIGTERM
    except Exception as exc:  # the flow has already recorded the failure in MLflow and Prefect
        term.print(f"[bold red]pipeline failed:[/] {type(exc).__name__}: {exc}", highlight=False)
    finally:
        _attach_log(uri, reporter.parent_run_id, log_file, term)
    if summary is None:
        term.print(f"full log: {log_file}", highlight=False)
        raise typer.Exit(code)
    table = Table(title=f"{summary.model_name}: variants x targets")
    for column in ("variant", "target", "runtime", "status", "ppl", "Δppl %", "size MB", "load s", "prefill ms", "decode tok/s", "gate", "version", "champion"):
        table.add_column(column, justify="right" if column not in {"variant", "target", "runtime", "status", "gate"} else "left")
    gate = {(d["target"], d["version"]): d for d in summary.decisions}
    for r in summary.results:
        d = gate.get((r.target, r.version), {}) if r.version else {}
        table.add_row(
            r.variant, r.target, r.runtime, r.status if r.status == "finished" else f"{r.status}: {r.reason}",
            *(_num(v, f) for v, f in ((r.ppl, ".3f"), (r.ppl_delta_pct, "+.2f"), (r.size_mb, ".1f"), (r.load_s, ".2f"), (r.prefill_ms, ".1f"), (r.decode_tok_s, ".1f"))),
            d.get("gate", ""), r.version or "", "★" if d.get("champion") else "",
        )
    term.print(table)
    for target, version in summary.champions.items():
        term.print(f"champion-{target}: " + (f"version {version}" if version else "none (no variant passed the gate)"))
        for verdict in (d["reason"] for d in summary.decisions if d["target"] == target and d["variant"] == "input"):
            term.print(f"  {verdict}", highlight=False)
    term.print(
        f"MLflow parent run {summary.parent_run_id}; open the UI with:\n  mlflow ui --backend-store-uri {summary.tracking_uri}\n"
        f"full log: {log_file}",
        highlight=False,
    )


@app.command()
def auto(
    model: Annotated[str, typer.Argument(help="embedded, a hub id (owner/name), a model folder or a .gguf file")],
    target: Annotated[list[str], typer.Option("--target", help="a target profile (repeat for several)")],
    name: Annotated[str | None, typer.Option(help="the registered model's name (default: <model>-auto)")] = None,
    max_size_mb: Annotated[float | None, typer.Option("--max-size-mb", help="the champion's file must be at most this size")] = None,
    min_decode_tok_s: Annotated[float | None, typer.Option("--min-decode-tok-s", help="... and decode at least this fast")] = None,
    max_ppl_increase: Annotated[float | None, typer.Option("--max-ppl-increase", help="the gate, in percent (default: the recipe schema's, 10)")] = None,
    objective: Annotated[str, typer.Option(help="smallest | fastest | best_quality, among those that pass")] = "smallest",
    calibration: Annotated[str, typer.Option(help="builtin:python-docs or a text file")] = "builtin:python-docs",
    evaluation: Annotated[str, typer.Option(help="builtin:python-docs or a text file")] = "builtin:python-docs",
    time_budget_min: Annotated[float | None, typer.Option("--time-budget-min", help="stop starting candidates once the search's builds and evaluations took this long")] = None,
    tracking_uri: TrackingUri = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the candidates, why each is in or out, and a rough time; write nothing")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing <name>.auto.yaml")] = False,
    no_register: Annotated[bool, typer.Option("--no-register", help="as for byoai run")] = False,
) -> None:
    """Write a recipe that searches every candidate the targets can ship, then run it: the best file per target."""
    import yaml

    from byoai.auto import InputStillBest, auto_recipe

    if objective not in ("smallest", "fastest", "best_quality"):
        err.print(f"[bold red]--objective {objective}:[/] use smallest, fastest or best_quality", highlight=False)
        raise typer.Exit(2)
    try:
        data, choices = auto_recipe(
            model, target, name, objective, max_size_mb, min_decode_tok_s, max_ppl_increase, calibration, evaluation,
            time_budget_min, Path.cwd(),
        )
    except InputStillBest as exc:
        console.print(str(exc), highlight=False)
        raise typer.Exit(0) from None
    except RecipeError as exc:
        err.print(f"[bold red]invalid input[/]\n{exc}", highlight=False)
        raise typer.Exit(2) from None
    table = Table(title=f"{data['name']}: candidates for {', '.join(target)} ({objective})")
    for column in ("candidate", "technique", "in", "why", "~min"):
        table.add_column(column, overflow="fold")
    for c in choices:
        table.add_row(c.variant["name"], c.kind, "yes" if c.included else "no", c.why, f"{c.estimate_s / 60:.1f}")
    console.print(table)
    total = sum(c.estimate_s for c in choices if c.included)
    console.print(f"{sum(c.included for c in choices)} candidates, at most ~{total / 60:.0f} min if none is pruned (rough: docs/auto.md)", highlight=False)
    if dry_run:
        return
    path = Path(f"{data['name']}.auto.yaml")
    if path.exists() and not force:
        err.print(f"[bold red]{path.resolve()} exists:[/] pass --force to overwrite it, or --name for another recipe", highlight=False)
        raise typer.Exit(2)
    import shlex
    import sys

    path.write_text(f"# written by `{shlex.join(['byoai', *sys.argv[1:]])}`; edit it and re-run it with `byoai run {path}`\n"
                    + yaml.safe_dump(data, sort_keys=False))
    console.print(f"recipe: {path.resolve()}", highlight=False)
    run(path, tracking_uri=tracking_uri, verbose=False, no_register=no_register)


def _attach_log(tracking_uri: str, run_id: str | None, log_file: Path, term: Console) -> None:
    """The run's log file beside its results in MLflow (logs/<file>)."""
    if run_id is None or not log_file.is_file():
        return
    from byoai.tasks.tracking import client

    try:
        client(tracking_uri).log_artifact(run_id, str(log_file), "logs")
    except Exception as exc:  # noqa: BLE001 - the run's results stand without their log
        term.print(f"could not attach the log to MLflow run {run_id}: {type(exc).__name__}: {exc}", highlight=False)


@app.command()
def deploy(
    recipe: Path,
    pool: Annotated[str | None, typer.Option(help="work pool (default: the first target's work_pool)")] = None,
    cron: Annotated[str | None, typer.Option(help="cron schedule (default: the recipe's schedule)")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Create or update a Prefect deployment of the recipe (needs PREFECT_API_URL: a server)."""
    parsed = _load(recipe)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        err.print("[bold red]no Prefect server:[/] set PREFECT_API_URL (infra/stack.sh start prints it)")
        raise typer.Exit(2)
    from byoai.flows.deploy import deploy_recipe

    try:
        deployment_id, dispatch = deploy_recipe(parsed, pool, cron, tracking_uri)
    except Exception as exc:
        err.print(f"[bold red]deploy failed:[/] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"deployment byoai/{parsed.name} ({deployment_id}) on pool {pool or parsed.targets[0].work_pool}")
    for target, deployment in dispatch.items():
        console.print(f"  target {target} is measured by {deployment} on its own pool (start a worker there)")
    console.print(f"trigger it: prefect deployment run 'byoai/{parsed.name}'")


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


@app.command()
def report(
    run_id: str,
    out: Annotated[Path, typer.Option(help="folder to write report.md, report.html, pareto-<target>.png")] = Path("byoai-report"),
    tracking_uri: TrackingUri = None,
) -> None:
    """Write a flow run's report (tables, selection, Pareto plots) from its MLflow parent run."""
    from mlflow.exceptions import MlflowException

    from byoai.settings import Settings
    from byoai.tasks.report import report_from_mlflow

    try:
        files = report_from_mlflow(Settings().tracking(tracking_uri), run_id, out)
    except MlflowException as exc:
        err.print(f"[bold red]no such run[/] {run_id}: {exc.message}", highlight=False)
        raise typer.Exit(2) from None
    for file in files:
        console.print(str(file))


@app.command()
def techniques() -> None:
    """The capability matrix: where each technique builds and runs, and what this worker can run."""
    from byoai import devices
    from byoai.recipe import available_targets, load_target
    from byoai.tasks.techniques import TECHNIQUES

    table = Table(title="techniques x devices")
    for column in ("technique", "cpu", "cuda", "calibration", "in targets", "what"):
        table.add_column(column)
    targets = [load_target(path) for path in available_targets(None).values()]
    for name, technique in sorted(TECHNIQUES.items()):
        table.add_row(
            name,
            *("yes" if device in technique.devices else "-" for device in ("cpu", "cuda")),
            "yes" if technique.needs_calibration else "no",
            ", ".join(t.name for t in targets if name in t.techniques) or "-",
            technique.summary,
        )
    console.print(table)
    for device in ("cpu", "cuda"):
        reason = devices.unavailable_reason(device)
        console.print(f"{device} on this worker: " + ("available" if reason is None else reason))
    from byoai.capability import runtime_skip_reason
    from byoai.tasks.runtimes import RUNTIMES

    runtimes = Table(title="runtimes x targets (what each target ships in, and whether this worker can build it)")
    for column in ("runtime", "formats", "target", "build", "on this worker"):
        runtimes.add_column(column)
    for name, runtime in RUNTIMES.items():
        for target in (t for t in targets if name in t.runtimes):
            flags = " ".join(target.runtimes[name].get("cmake_args", ())) or "installed with byoai"
            runtimes.add_row(name, ", ".join(sorted(runtime.formats)), target.name, flags, runtime_skip_reason(target, name) or "yes")
    console.print(runtimes)


@app.command("build-runtimes")
def build_runtimes(
    targets: Annotated[list[str] | None, typer.Argument(help="target profiles (default: cpu-x86)")] = None,
) -> None:
    """Compile the runtimes the target profiles name for this worker (cached; infra/install.sh runs it)."""
    from byoai.capability import runtime_skip_reason
    from byoai.recipe import available_targets, load_target
    from byoai.settings import Settings
    from byoai.tasks.runtimes import RUNTIMES, RuntimeUnavailable

    known = available_targets(None)
    names = targets or ["cpu-x86"]
    unknown = [n for n in names if n not in known]
    if unknown:
        err.print(f"[bold red]unknown target(s)[/] {unknown}; allowed: {', '.join(sorted(known))}", highlight=False)
        raise typer.Exit(2)
    cache = Settings().cache_dir.expanduser().resolve()
    for target in (load_target(known[n]) for n in names):
        for name in target.runtimes:
            if (reason := runtime_skip_reason(target, name)) is not None:
                console.print(f"{target.name} {name}: skipped, {reason}")
                continue
            console.print(f"{target.name} {name}: preparing (a compiled runtime takes minutes the first time, then it is cached) ...")
            try:
                build = RUNTIMES[name].build(target.runtime_config(name), cache)
            except RuntimeUnavailable as exc:
                err.print(f"[bold red]{target.name} {name} failed:[/] {exc}", highlight=False)
                raise typer.Exit(1) from None
            console.print(f"{target.name} {name}: {build.key} {build.path or ''} ({build.build_s:.0f} s to compile)".rstrip())


@app.command()
def runs(
    repair: Annotated[bool, typer.Option("--repair", help="mark FAILED the RUNNING runs of this host whose process is gone")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """List byoai's RUNNING parent runs on this host and whether their process is alive; --repair fails the dead ones."""
    import socket

    from byoai.lifecycle import process_alive, repair_stale_runs
    from byoai.settings import Settings
    from byoai.tasks.tracking import TAG, client

    uri = Settings().tracking(tracking_uri)
    if repair:
        repaired = repair_stale_runs(uri)
        for run_id, reason in repaired:
            console.print(f"{run_id}: FAILED ({reason})", highlight=False)
        console.print(f"{len(repaired)} run(s) repaired")
        return
    mlflow = client(uri)
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    found = mlflow.search_runs(experiments, f"tags.`{TAG}kind` = 'flow' and attributes.status = 'RUNNING'") if experiments else []
    table = Table(title="byoai parent runs RUNNING")
    for column in ("run", "name", "host", "pid", "process"):
        table.add_column(column)
    for run in found:
        tags = run.data.tags
        here = tags.get(f"{TAG}host") == socket.gethostname()
        pid = int(tags.get(f"{TAG}pid", "0") or 0)
        state = ("alive" if process_alive(pid, float(tags.get(f"{TAG}pid_started", "0") or 0) or None) else "gone (byoai runs --repair)") if here else "another host: not checked"
        table.add_row(run.info.run_id, run.info.run_name or "", tags.get(f"{TAG}host", ""), str(pid or ""), state)
    console.print(table)


@app.command()
def serve(
    name: Annotated[str, typer.Argument(help="the registered model (a recipe's name)")],
    target: Annotated[str | None, typer.Option("--target", help="serve champion-TARGET (default: the first champion whose device this machine has)")] = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option("--port", help="port (default: a free one)")] = None,
    tracking_uri: TrackingUri = None,
    detach: Annotated[bool, typer.Option("--detach", help="run in the background; stop it with byoai serve --stop NAME")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="stop NAME's detached server")] = False,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="serve without an API key (loopback host only)")] = False,
) -> None:
    """Serve a champion with llama-server behind an OpenAI-compatible API (key: BYOAI_SERVE_API_KEY)."""
    from byoai.serve import ServeError, serve_champion, stop_served
    from byoai.settings import Settings

    def say(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    try:
        if stop:
            code = stop_served(name, say)
        else:
            code = serve_champion(Settings().tracking(tracking_uri), name, target, host, port, detach, no_auth, say)
    except ServeError as exc:
        err.print(f"[bold red]cannot serve:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command()
def champions(name: str, tracking_uri: TrackingUri = None) -> None:
    """Show the champion-<target> aliases of a registered model and their metrics."""
    from mlflow.exceptions import MlflowException

    from byoai.settings import Settings
    from byoai.tasks.tracking import TAG, client, evaluation_run_id

    uri = Settings().tracking(tracking_uri)
    mlflow = client(uri)
    try:
        model = mlflow.get_registered_model(name)
    except MlflowException:
        err.print(f"[bold red]no registered model '{name}'[/] at {uri}", highlight=False)
        raise typer.Exit(2) from None
    table = Table(title=f"{name}: champions")
    for column in ("alias", "version", "variant", "technique", "target", "runtime", "build", "format", "ppl", "Δppl %", "size MB", "decode tok/s", "source"):
        table.add_column(column)
    for alias, version in sorted(model.aliases.items()):
        mv = mlflow.get_model_version(name, version)
        run_id = evaluation_run_id(mv)
        metrics = mlflow.get_run(run_id).data.metrics if run_id else {}
        table.add_row(
            alias, str(version), mv.tags.get(f"{TAG}variant", ""), mv.tags.get(f"{TAG}technique", ""), mv.tags.get(f"{TAG}target", ""),
            mv.tags.get(f"{TAG}runtime", "transformers"), mv.tags.get(f"{TAG}runtime_build", ""),
            mv.tags.get(f"{TAG}format", "hf") + (f" {mv.tags[f'{TAG}quant_type']}" if f"{TAG}quant_type" in mv.tags else ""),
            _num(metrics.get("ppl"), ".3f"), _num(metrics.get("ppl_delta_pct"), "+.2f"), _num(metrics.get("size_mb"), ".1f"),
            _num(metrics.get("decode_tok_s"), ".1f"), mv.source,
        )
    console.print(table)
    if not model.aliases:
        console.print("no champion yet")


if __name__ == "__main__":
    app()
