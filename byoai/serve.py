"""`byoai serve NAME`: the registry's champion behind an authenticated OpenAI-compatible endpoint.

It resolves `champion-<target>` in the registry (the MLflow server, or the local store),
downloads that version, and runs llama-server from this machine's build of the runtime the
version was measured in: the same llama-cpp-python version and CMake flags, compiled here if
this machine has no build yet. The server gets the flags the serving measurement used (slots,
context per slot), the target's threads, and a speculative pair's draft and flags. The API key
comes from BYOAI_SERVE_API_KEY.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from byoai.settings import Settings

API_KEY_ENV = "BYOAI_SERVE_API_KEY"
# Without a serving profile measured: slots and a context per slot that suit a chat client.
DEFAULT_SLOTS = 4
DEFAULT_SLOT_CONTEXT = 4096
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ServeError(Exception):
    """Bad input for `byoai serve` (exit 2); str() says what to change."""


@dataclass(frozen=True)
class Champion:
    name: str
    target: str
    version: str
    run_id: str
    params: dict[str, str]  # the evaluation run's params: runtime flags, serving slots and context


def pid_file(name: str) -> Path:
    return Settings().resolved_home() / "serve" / f"{name}.json"


def _has_cuda() -> bool:
    from byoai.devices import unavailable_reason

    return unavailable_reason("cuda") is None


def resolve_champion(tracking_uri: str, name: str, target: str | None) -> Champion:
    """champion-<target> of the registered model; without `target`, the first champion whose
    device this machine has (CPU targets always, CUDA ones where a GPU is)."""
    from mlflow.exceptions import MlflowException

    from byoai.recipe import available_targets, load_target
    from byoai.tasks.tracking import TAG, client, evaluation_run_id

    mlflow = client(tracking_uri)
    try:
        model = mlflow.get_registered_model(name)
    except MlflowException:
        raise ServeError(f"no registered model '{name}' at {tracking_uri}; give --tracking-uri or run a recipe first") from None
    champions = {alias.removeprefix("champion-"): version for alias, version in sorted(model.aliases.items()) if alias.startswith("champion-")}
    if not champions:
        raise ServeError(f"'{name}' has no champion yet (no champion-<target> alias): run its recipe until one passes the gate")
    if target is None:
        profiles = available_targets(None)
        here = [t for t in champions if t not in profiles or load_target(profiles[t]).device == "cpu" or _has_cuda()]
        if not here:
            raise ServeError(f"none of {name}'s champions ({', '.join(champions)}) runs on this machine's devices; give --target")
        target = here[0]
    if target not in champions:
        raise ServeError(f"'{name}' has no champion-{target}; its champions: {', '.join(champions)}")
    version = mlflow.get_model_version(name, champions[target])
    runtime = version.tags.get(f"{TAG}runtime", "transformers")
    if runtime != "llama_cpp":
        raise ServeError(f"champion-{target} of '{name}' (version {version.version}) runs in {runtime}, which has no server byoai "
                         "builds; byoai serve runs GGUF champions in llama-server")
    run_id = evaluation_run_id(version)
    return Champion(name, target, str(version.version), run_id, mlflow.get_run(run_id).data.params)


def download(tracking_uri: str, champion: Champion) -> Path:
    """The version's files (model.gguf, tokenizer, card), once per version on this machine."""
    import mlflow

    folder = Settings().resolved_home() / "serve" / f"{champion.name}-v{champion.version}"
    if (folder / "model.gguf").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{champion.name}/{champion.version}", dst_path=str(tmp)))
    found = next(path.rglob("model.gguf"), None)
    if found is None:
        raise ServeError(f"version {champion.version} of '{champion.name}' has no model.gguf (its files: {sorted(p.name for p in path.rglob('*'))[:10]})")
    found.parent.rename(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def runtime_build(champion: Champion):
    """This machine's llama.cpp build with the flags the champion was measured with."""
    from byoai.tasks.runtimes.llama_cpp import LlamaCppConfig, build, profile_cmake_args

    flags = profile_cmake_args(champion.params.get("runtime.flags", "").split())
    config = LlamaCppConfig(version=champion.params.get("runtime.version") or LlamaCppConfig().version, cmake_args=flags or LlamaCppConfig().cmake_args)
    return build(config, Settings().cache_dir.expanduser().resolve())


def draft_flags(folder: Path) -> tuple[str, ...]:
    """A speculative pair's server flags (server-args.json), its draft file made absolute; () otherwise."""
    args_file = folder / "server-args.json"
    if not args_file.is_file():
        return ()
    return tuple(str(folder / "draft.gguf") if arg == "draft.gguf" else arg for arg in json.loads(args_file.read_text())["args"])


def threads_of(target: str) -> int:
    from byoai.recipe import available_targets, load_target

    profiles = available_targets(None)
    threads = load_target(profiles[target]).threads if target in profiles else None
    return threads or os.cpu_count() or 1


def serve_champion(tracking_uri: str, name: str, target: str | None, host: str, port: int | None, detach: bool, no_auth: bool, say=print) -> int:
    """Start the champion's server; in the foreground wait for it (SIGTERM/SIGINT stop it
    cleanly), with `detach` record it in a pid file and return. Returns the exit code."""
    from byoai.tasks.serving import ServerSpec, start_server, stop_process

    api_key = os.environ.get(API_KEY_ENV) or None
    if api_key is None and not no_auth:
        raise ServeError(f"set {API_KEY_ENV} to the API key clients must send (or give --no-auth, on a loopback host only)")
    if api_key is None and host not in LOOPBACK:
        raise ServeError(f"--no-auth serves anyone who can reach {host}: it is allowed on a loopback host only (127.0.0.1); set {API_KEY_ENV}")
    existing = pid_file(name)
    if existing.is_file() and _alive(json.loads(existing.read_text())):
        raise ServeError(f"'{name}' is already served ({json.loads(existing.read_text())['url']}); stop it with byoai serve --stop {name}")
    champion = resolve_champion(tracking_uri, name, target)
    say(f"champion-{champion.target}: {name} version {champion.version}; preparing its files and llama.cpp build ...")
    folder = download(tracking_uri, champion)
    build = runtime_build(champion)
    spec = ServerSpec(
        model=folder / "model.gguf", threads=threads_of(champion.target),
        slots=int(champion.params.get("serving.slots", DEFAULT_SLOTS)),
        slot_context=int(champion.params.get("serving.slot_context", DEFAULT_SLOT_CONTEXT)),
        device="cuda" if "-DGGML_CUDA=ON" in build.flags else "cpu", extra_args=draft_flags(folder),
    )
    log = Settings().logs_dir() / "servers" / f"serve-{name}.log"
    server = start_server("llama_cpp", build, spec, api_key, log, host=host, port=port, detach=detach)
    record = {"pid": server.process.pid, "url": server.url, "version": champion.version, "target": champion.target, "log": str(log),
              "started": _start_time(server.process.pid)}
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_text(json.dumps(record))
    drafted = " with its draft (speculative decoding)" if spec.extra_args else ""
    say(f"serving {name} v{champion.version} (champion-{champion.target}){drafted} at {server.url}/v1 "
        f"({spec.slots} slots x {spec.slot_context} tokens, {spec.threads} threads; log {log})")
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if api_key else ""
    say(f"try: curl {server.url}/v1/completions{auth} -H 'Content-Type: application/json' -d '{{\"prompt\": \"def fib(n):\", \"max_tokens\": 32}}'")
    if detach:
        say(f"detached (pid {server.process.pid}); stop it with: byoai serve --stop {name}")
        return 0

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        say("stopping the server ...")
        stop_process(server.process)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_process(server.process)
        existing.unlink(missing_ok=True)


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(record: dict) -> bool:
    """The recorded server is still that process (not another that reused its pid)."""
    return bool(record.get("started")) and _start_time(int(record["pid"])) == record["started"]


def stop_served(name: str, say=print) -> int:
    """`byoai serve --stop NAME`: SIGTERM the detached server, wait until it is gone."""
    path = pid_file(name)
    if not path.is_file():
        raise ServeError(f"no detached server of '{name}' on this machine ({path} does not exist)")
    record = json.loads(path.read_text())
    if _alive(record):
        os.kill(int(record["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(record) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(record):
            os.kill(int(record["pid"]), signal.SIGKILL)
        say(f"stopped {name} (pid {record['pid']}, {record['url']})")
    else:
        say(f"{name}'s server (pid {record['pid']}) had already stopped")
    path.unlink(missing_ok=True)
    return 0
