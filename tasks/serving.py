"""serve_in_runtime: a GGUF candidate served by llama-server to concurrent streaming users.

What a user of the champion runs is a server, not one greedy stream: llama-server, built from the
same vendored llama.cpp with the target's flags (tasks.runtimes.llama_cpp), serves the artifact on
127.0.0.1 and a free port, behind a fresh API key, with the target's threads, one slot per user of
the largest level and a context per slot of the prompt plus the new tokens. A closed-loop load
generator drives it at each `users` level of the recipe's serving profile through the
OpenAI-compatible streaming API (httpx reading the server-sent events): each user sends its
requests one after another, a fixed seed chooses the prompts from the evaluation text.

Per level: TTFT and inter-token latency percentiles, output tokens/s in total and per user,
requests/s, the share of prompt tokens the server's prompt cache served (the responses' cached
token counts), the server's Prometheus `/metrics`, and the CPU seconds of the server and of the
load generator, which shares the machine with it.

It runs in a worker process (byoai.isolation) and the server is that worker's child, stopped in a
`finally` and killed by the kernel when the worker dies (PR_SET_PDEATHSIG): a failed measurement,
an out-of-memory kill or a SIGTERM to byoai leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict

from byoai import progress
from byoai.log import step_logger
from byoai.recipe import ServingSpec, TargetProfile
from byoai.tasks.build import Artifact
from byoai.tasks.data import CACHED, TokensRef
from byoai.tasks.runtimes import RUNTIMES, RuntimeBuild

# Prompts a speculative pair is measured on, alone and with its draft: fewer leave the 1-user
# decode speed-up within its own noise (about ±10 % with 4 prompts on a busy 2-core worker).
PAIR_PROMPTS = 12
# How long a server may take to load its model and answer /health (a large GGUF on a slow disk).
READY_TIMEOUT_S = 300.0
_PR_SET_PDEATHSIG = 1


class ServingUnavailable(RuntimeError):
    """The server did not start or answer; str() has the end of its log."""


class LevelResult(BaseModel):
    """What `users` concurrent streaming users saw, and what it cost the server and the client."""

    model_config = ConfigDict(frozen=True)

    users: int
    requests: int
    errors: int
    ttft_ms_p50: float
    ttft_ms_p95: float
    itl_ms_p50: float
    itl_ms_p95: float
    tok_s: float  # output tokens per second, all users together
    tok_s_per_user: float  # median over requests of one request's output tokens / its duration
    requests_per_s: float
    cache_hit_share: float  # prompt tokens served from the server's prompt cache / prompt tokens
    output_tokens: int
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float
    server_metrics: dict[str, float] = {}  # llama-server's /metrics after the level (Prometheus)


class ServingMetrics(BaseModel):
    """A candidate served at every level of the profile."""

    model_config = ConfigDict(frozen=True)

    levels: list[LevelResult]
    server: str  # the server's version (llama-server --version)
    args: list[str]  # the server's flags, without the model path, port and key
    slots: int
    slot_context: int

    def at(self, users: int) -> LevelResult | None:
        return next((level for level in self.levels if level.users == users), None)

    def flat(self) -> dict[str, float]:
        """MLflow metrics: serving.u<N>.<name> per level."""
        keep = ("ttft_ms_p50", "ttft_ms_p95", "itl_ms_p50", "itl_ms_p95", "tok_s", "tok_s_per_user", "requests_per_s",
                "cache_hit_share", "errors", "server_cpu_s", "client_cpu_s")
        return {f"serving.u{level.users}.{name}": float(getattr(level, name)) for level in self.levels for name in keep}


class ServeRequest(BaseModel):
    """What a serving worker needs; sent to it as JSON."""

    model_config = ConfigDict(frozen=True)

    runtime: str
    build: RuntimeBuild
    artifact_path: str
    device: str
    threads: int | None
    windows_path: str
    serving: dict  # byoai.recipe.ServingSpec as JSON
    log_path: str
    extra_args: tuple[str, ...] = ()  # more server flags (a draft's)
    # a speculative pair: the draft's file ("" for n-gram speculation), its name, the recipe's
    # SpeculativeSpec as JSON
    draft_path: str = ""
    draft_name: str = ""
    speculative: dict | None = None


@dataclass(frozen=True)
class ServerSpec:
    """How a server is started for one artifact (a runtime's `server_command` turns it into argv)."""

    model: Path
    threads: int
    slots: int
    slot_context: int
    device: str
    extra_args: tuple[str, ...] = ()  # more server flags (e.g. a draft model's)


# ---------------------------------------------------------------- the server process
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In the server's process, before exec: the kernel kills it when its parent dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; returns once the process is gone."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    process: subprocess.Popen
    args: list[str]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def start_server(runtime: str, build: RuntimeBuild, spec: ServerSpec, api_key: str | None, log_path: Path,
                 host: str = "127.0.0.1", port: int | None = None, detach: bool = False) -> Server:
    """Start the runtime's server on the artifact and wait until it answers /health.

    `api_key` None: no key asked (`byoai serve --no-auth`, loopback only). `detach`: the server
    outlives this process (its own session, no death signal): `byoai serve --detach`. Otherwise it
    dies with this process.
    """
    import httpx

    argv, env = RUNTIMES[runtime].server_command(build, spec)
    port = port or free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*argv, "--host", host, "--port", str(port), *(["--api-key", api_key] if api_key else [])], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=detach, preexec_fn=None if detach else die_with_parent,
        )
    server = Server(f"http://{'127.0.0.1' if host in {'0.0.0.0', '::'} else host}:{port}", api_key, process, argv[1:])
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise ServingUnavailable(f"{Path(argv[0]).name} exited with {process.returncode} before it answered:\n{_log_tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return server
            if time.monotonic() > deadline:
                raise ServingUnavailable(f"{Path(argv[0]).name} did not answer /health within {READY_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}")
            time.sleep(0.1)
    except BaseException:
        stop_process(process)
        raise


@contextlib.contextmanager
def running_server(runtime: str, build: RuntimeBuild, spec: ServerSpec, log_path: Path) -> Iterator[Server]:
    """A server for the length of the block, behind a fresh API key; always stopped after it."""
    server = start_server(runtime, build, spec, secrets.token_urlsafe(24), log_path)
    try:
        yield server
    finally:
        stop_process(server.process)


# ---------------------------------------------------------------- the load generator
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks (numpy's default); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def prompts_for(stream: list[int], spec: ServingSpec, count: int, seed: int) -> list[list[int]]:
    """`count` prompts of spec.prompt_tokens token ids cut from the evaluation text at seeded
    offsets, the first spec.shared_prefix_tokens of every prompt the same."""
    import random

    rng = random.Random(seed)
    length = spec.prompt_tokens - spec.shared_prefix_tokens
    text = stream * (1 + (spec.prompt_tokens * 2) // max(1, len(stream)))  # a short text wraps around
    prefix = text[: spec.shared_prefix_tokens]
    start = spec.shared_prefix_tokens
    return [prefix + text[(offset := rng.randrange(start, len(text) - length + 1)): offset + length] for _ in range(count)]


@dataclass
class RequestResult:
    started: float
    token_times: list[float]
    ended: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    text: str
    timings: dict
    error: str = ""


def completion_body(prompt: list[int] | str, new_tokens: int, stream: bool, seed: int = 0) -> dict:
    """An OpenAI-style completion request: greedy, exactly `new_tokens` (EOS ignored), prompt cache on."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "seed": seed, "stream": stream,
            "ignore_eos": True, "cache_prompt": True}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def complete(client, server: Server, prompt: list[int] | str, new_tokens: int, stream: bool = True) -> RequestResult:
    """One completion through /v1/completions, timing every streamed token as it arrives."""
    body = completion_body(prompt, new_tokens, stream)
    started = time.perf_counter()
    times: list[float] = []
    pieces: list[str] = []
    usage: dict = {}
    timings: dict = {}
    if stream:
        with client.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers()) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("choices"):
                    times.append(time.perf_counter())
                    pieces.append(chunk["choices"][0].get("text") or "")
                usage = chunk.get("usage") or usage
                timings = chunk.get("timings") or timings
    else:
        response = client.post(f"{server.url}/v1/completions", json=body, headers=server.headers())
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        data = response.json()
        times.append(time.perf_counter())
        pieces.append(data["choices"][0].get("text") or "")
        usage, timings = data.get("usage") or {}, data.get("timings") or {}
    ended = time.perf_counter()
    return RequestResult(
        started=started, token_times=times, ended=ended,
        completion_tokens=int(usage.get("completion_tokens", timings.get("predicted_n", len(times)))),
        prompt_tokens=int(usage.get("prompt_tokens", len(prompt) if isinstance(prompt, list) else 0)),
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", timings.get("cache_n", 0))),
        text="".join(pieces), timings=timings,
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def server_metrics(server: Server) -> dict[str, float]:
    """The server's Prometheus /metrics as name -> value (labels kept in the name)."""
    import httpx

    try:
        text = httpx.get(f"{server.url}/metrics", headers=server.headers(), timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def drive_level(server: Server, prompts: list[list[int]], users: int, new_tokens: int, stream: bool) -> LevelResult:
    """Closed loop: `users` threads, each sending its share of `prompts` one after another."""
    import httpx

    per_user = len(prompts) // users
    results: list[RequestResult] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(users)

    def user(index: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
            barrier.wait()
            for prompt in prompts[index * per_user: (index + 1) * per_user]:
                try:
                    result = complete(client, server, prompt, new_tokens, stream)
                except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=user, args=(i,), name=f"byoai-user-{i}") for i in range(users)]
    server_cpu, client_cpu = _cpu_seconds(server.process.pid), time.process_time()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    server_cpu, client_cpu = _cpu_seconds(server.process.pid) - server_cpu, time.process_time() - client_cpu
    if not results:
        raise RuntimeError(f"every request at {users} users failed: {errors[0] if errors else 'no request sent'}")
    ttft = [(r.token_times[0] - r.started) * 1000 for r in results if r.token_times]
    itl = [(b - a) * 1000 for r in results for a, b in zip(r.token_times, r.token_times[1:])]
    tokens = sum(r.completion_tokens for r in results)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    return LevelResult(
        users=users, requests=len(results), errors=len(errors),
        ttft_ms_p50=percentile(ttft, 50), ttft_ms_p95=percentile(ttft, 95), itl_ms_p50=percentile(itl, 50), itl_ms_p95=percentile(itl, 95),
        tok_s=tokens / wall, tok_s_per_user=statistics.median(r.completion_tokens / (r.ended - r.started) for r in results),
        requests_per_s=len(results) / wall, cache_hit_share=sum(r.cached_tokens for r in results) / prompt_tokens if prompt_tokens else 0.0,
        output_tokens=tokens, wall_s=wall, server_cpu_s=server_cpu, client_cpu_s=client_cpu, server_metrics=server_metrics(server),
    )


def evaluation_stream(windows_path: str) -> list[int]:
    from byoai.tasks.data import load_windows

    return [int(t) for t in load_windows(windows_path).flatten().tolist()]


def measure_serving(request: ServeRequest) -> ServingMetrics:
    """Serve the artifact and drive it at every level of the profile (in this process)."""
    import httpx

    spec = ServingSpec.model_validate(request.serving)
    slots = max(spec.users)
    server_spec = ServerSpec(
        model=Path(request.artifact_path) / RUNTIMES[request.runtime].served_file, threads=request.threads or os.cpu_count() or 1,
        slots=slots, slot_context=spec.slot_context + (64 if request.extra_args else 0), device=request.device,
        extra_args=request.extra_args,
    )
    stream = evaluation_stream(request.windows_path)
    with running_server(request.runtime, request.build, server_spec, Path(request.log_path)) as server:
        with httpx.Client(timeout=600) as client:  # warm-up: the first request pays one-off costs
            complete(client, server, prompts_for(stream, spec, 1, seed=-1)[0], min(4, spec.new_tokens), spec.stream)
        levels = []
        for users in spec.users:
            prompts = prompts_for(stream, spec, users * spec.requests_per_user, seed=users)
            levels.append(drive_level(server, prompts, users, spec.new_tokens, spec.stream))
        version = request.build.server_version
    return ServingMetrics(levels=levels, server=version, args=server.args, slots=slots, slot_context=spec.slot_context)


@task(cache_policy=CACHED, persist_result=True)
def serve_in_runtime(
    artifact: Artifact, target: TargetProfile, runtime: str, build: RuntimeBuild, perplexity_tokens: TokensRef, serving: ServingSpec,
) -> ServingMetrics:
    """The artifact served by its runtime's server at each `users` level (in a worker process)."""
    from byoai.isolation import run_worker
    from byoai.settings import Settings

    progress.from_task("serving")
    log_path = Settings().logs_dir() / "servers" / f"{Path(artifact.path).name}-{target.name}-{runtime}.log"
    request = ServeRequest(
        runtime=runtime, build=build, artifact_path=artifact.path, device=target.device, threads=target.threads,
        windows_path=perplexity_tokens.path, serving=serving.model_dump(mode="json"), log_path=str(log_path),
    )
    metrics, _, output = run_worker("serve", request.model_dump_json(), dict(os.environ))
    if output.strip():
        step_logger().debug("serving worker output:\n%s", output[-10000:])
    top = metrics.levels[-1]
    step_logger().info("%s on %s served by %s: %d users %.1f tok/s, p95 TTFT %.0f ms, p95 ITL %.0f ms",
                       artifact.technique, target.name, runtime, top.users, top.tok_s, top.ttft_ms_p95, top.itl_ms_p95)
    return metrics


# ---------------------------------------------------------------- speculative decoding
class PairResult(BaseModel):
    """A main model served alone and with a draft (a smaller GGUF, or llama.cpp's n-gram lookup)
    on the same prompts, one slot, greedy: speed, acceptance and whether the output is the same."""

    model_config = ConfigDict(frozen=True)

    draft: str  # the draft's name, or "ngram-simple" (no draft model)
    n_max: int
    p_min: float
    main_tok_s: float  # median over prompts of the server's own decode speed (timings)
    pair_tok_s: float
    speedup: float
    main_ttft_ms: float  # median of the server's prompt time
    pair_ttft_ms: float
    drafted: int  # tokens the draft proposed, and how many the main model accepted
    accepted: int
    acceptance: float
    draft_size_ratio: float  # the draft file's size over the main file's (0 for n-gram)
    identical: bool
    first_difference: str  # "" when identical, else where and which tokens

    def profile(self) -> dict[str, float]:
        """As MLflow metrics and a result row's profile: speculative.<name>."""
        keep = ("acceptance", "drafted", "accepted", "main_tok_s", "pair_tok_s", "speedup", "main_ttft_ms", "pair_ttft_ms", "draft_size_ratio",
                "n_max", "p_min")
        return {f"speculative.{k}": float(getattr(self, k)) for k in keep} | {"speculative.identical": float(self.identical)}


def first_difference(alone: list[list[int]], paired: list[list[int]]) -> str:
    """Where the outputs with a draft first differ from the main model's alone ("" when identical)."""
    for i, (a, b) in enumerate(zip(alone, paired, strict=True)):
        diff = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diff is None and len(a) != len(b):
            diff = min(len(a), len(b))
        if diff is not None:
            main = a[diff] if diff < len(a) else "end"
            with_draft = b[diff] if diff < len(b) else "end"
            return f"prompt {i}, token {diff}: token id {main} alone, {with_draft} with the draft"
    return ""


def greedy(client, server: Server, prompt: list[int], new_tokens: int) -> dict:
    """One greedy completion through llama-server's /completion, with its token ids and timings."""
    body = {"prompt": prompt, "n_predict": new_tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
            "cache_prompt": False, "return_tokens": True, "stream": False}
    response = client.post(f"{server.url}/completion", json=body, headers=server.headers())
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


def greedy_runs(runtime: str, build: RuntimeBuild, spec: ServerSpec, prompts: list[list[int]], new_tokens: int, log_path: Path) -> list[dict]:
    import httpx

    with running_server(runtime, build, spec, log_path) as server, httpx.Client(timeout=600) as client:
        greedy(client, server, prompts[0][:8], 2)  # warm-up
        return [greedy(client, server, prompt, new_tokens) for prompt in prompts]


def measure_pair(runtime: str, build: RuntimeBuild, main: Path, draft: Path | None, draft_name: str, prompts: list[list[int]],
                 new_tokens: int, threads: int, n_max: int, p_min: float, log_path: Path, device: str = "cpu") -> PairResult:
    """The main model alone, then with the draft (or n-gram speculation when `draft` is None)."""
    base = ServerSpec(model=main, threads=threads, slots=1, slot_context=max(len(p) for p in prompts) + new_tokens + n_max + 8, device=device)
    extra = draft_args(draft, n_max, p_min, device)
    alone = greedy_runs(runtime, build, base, prompts, new_tokens, log_path)
    paired = greedy_runs(runtime, build, ServerSpec(**{**base.__dict__, "extra_args": extra}), prompts, new_tokens, log_path)
    first = first_difference([r["tokens"] for r in alone], [r["tokens"] for r in paired])
    drafted = sum(int(r["timings"].get("draft_n", 0)) for r in paired)
    accepted = sum(int(r["timings"].get("draft_n_accepted", 0)) for r in paired)
    main_tok_s = statistics.median(r["timings"]["predicted_per_second"] for r in alone)
    pair_tok_s = statistics.median(r["timings"]["predicted_per_second"] for r in paired)
    return PairResult(
        draft=draft_name, n_max=n_max, p_min=p_min, main_tok_s=main_tok_s, pair_tok_s=pair_tok_s, speedup=pair_tok_s / main_tok_s,
        main_ttft_ms=statistics.median(r["timings"]["prompt_ms"] for r in alone),
        pair_ttft_ms=statistics.median(r["timings"]["prompt_ms"] for r in paired),
        drafted=drafted, accepted=accepted, acceptance=accepted / drafted if drafted else 0.0,
        draft_size_ratio=draft.stat().st_size / main.stat().st_size if draft else 0.0, identical=not first, first_difference=first,
    )


def draft_args(draft: Path | None, n_max: int, p_min: float, device: str = "cpu") -> tuple[str, ...]:
    """llama-server's flags for speculative decoding with a draft model, or n-gram lookup without one."""
    flags = ("--spec-draft-n-max", str(n_max), "--spec-draft-p-min", str(p_min))
    if draft is None:
        return ("--spec-type", "ngram-simple", *flags)
    return ("--spec-type", "draft-simple", "-md", str(draft), "-ngld", "999" if device == "cuda" else "0", *flags)


class PairMeasured(BaseModel):
    """A speculative pair: at 1 user against the main model alone, and (when its output is the
    main model's) under the serving profile."""

    model_config = ConfigDict(frozen=True)

    pair: PairResult
    served: ServingMetrics | None = None


def measure_speculation(request: ServeRequest) -> PairMeasured:
    """In a worker: the pair at 1 user (measure_pair), then, if lossless, the serving profile."""
    from byoai.recipe import SpeculativeSpec

    spec = ServingSpec.model_validate(request.serving)
    spec_draft = SpeculativeSpec.model_validate(request.speculative)
    main = Path(request.artifact_path) / RUNTIMES[request.runtime].served_file
    draft = Path(request.draft_path) if request.draft_path else None
    prompts = prompts_for(evaluation_stream(request.windows_path), spec, PAIR_PROMPTS, seed=0)
    pair = measure_pair(request.runtime, request.build, main, draft, request.draft_name, prompts, spec.new_tokens,
                        request.threads or os.cpu_count() or 1, spec_draft.n_max, spec_draft.p_min, Path(request.log_path), request.device)
    if not pair.identical:
        return PairMeasured(pair=pair)
    extra = draft_args(draft, spec_draft.n_max, spec_draft.p_min, request.device)
    return PairMeasured(pair=pair, served=measure_serving(request.model_copy(update={"extra_args": extra})))


@task(cache_policy=CACHED, persist_result=True)
def speculate_in_runtime(
    artifact: Artifact, draft_file: str, draft_sha: str, draft_name: str, target: TargetProfile, runtime: str, build: RuntimeBuild,
    perplexity_tokens: TokensRef, serving: ServingSpec, speculative,
) -> PairMeasured:
    """A main model with a draft GGUF file ("": n-gram speculation), measured in a worker process;
    `draft_sha` (the file's content) keys the cache."""
    from byoai.isolation import run_worker
    from byoai.settings import Settings

    progress.from_task("speculating")
    log_path = Settings().logs_dir() / "servers" / f"{Path(artifact.path).name}-{draft_name}-{target.name}.log"
    request = ServeRequest(
        runtime=runtime, build=build, artifact_path=artifact.path, device=target.device, threads=target.threads,
        windows_path=perplexity_tokens.path, serving=serving.model_dump(mode="json"), log_path=str(log_path),
        draft_path=draft_file, draft_name=draft_name,
        speculative=speculative.model_dump(mode="json"),
    )
    measured, _, output = run_worker("speculate", request.model_dump_json(), dict(os.environ))
    if output.strip():
        step_logger().debug("speculation worker output:\n%s", output[-10000:])
    pair = measured.pair
    step_logger().info("%s with draft %s on %s: %.2fx decode, acceptance %.2f, output %s", artifact.technique, draft_name, target.name,
                       pair.speedup, pair.acceptance, "identical" if pair.identical else f"differs ({pair.first_difference})")
    return measured
