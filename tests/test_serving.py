"""Serving: llama-server built with the runtime, driven by a real streaming HTTP client; the SLO gate
and the capacity objective; `byoai serve` behind an API key. Tiny GGUF models, real servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from byoai.cli import app
from byoai.recipe import GateSpec, PromotionSpec, ServingSpec, SloSpec, TargetProfile, load_recipe
from byoai.settings import Settings
from byoai.tasks.promote import Candidate, decide
from tests.test_flow import mlflow_client

SERVING = ServingSpec(users=(1, 2), requests_per_user=2, prompt_tokens=32, new_tokens=8, shared_prefix_tokens=16)


def llama_servers() -> set[int]:
    """Pids of llama-server processes on this machine."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"llama-server" in (proc / "cmdline").read_bytes().split(b"\0")[0]:
                    found.add(int(proc.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def served_q8(gguf_bench):
    """The GGUF tiny model as q8_0, this worker's llama.cpp build and a target profile."""
    from byoai.tasks.runtime_build import build_runtime

    target = TargetProfile(name="test-cpu", device="cpu", techniques=("gguf",), threads=2, runtimes={"transformers": {}, "llama_cpp": {}})
    build = build_runtime.fn("llama_cpp", target.runtimes["llama_cpp"], str(Settings().cache_dir))
    return gguf_bench.build("gguf", {"quant_type": "q8_0"}), target, build


def test_streaming_metrics_are_sane_and_the_server_is_stopped(served_q8, gguf_bench, workdir):
    from byoai.tasks.serving import serve_in_runtime

    artifact, target, build = served_q8
    assert "llama-server" in build.server_version or "version" in build.server_version, build.server_version
    before = llama_servers()
    served = serve_in_runtime.fn(artifact, target, "llama_cpp", build, gguf_bench.tokens, SERVING)
    assert llama_servers() == before  # the worker stopped its server
    assert [level.users for level in served.levels] == [1, 2] and served.slots == 2 and served.slot_context == 40
    for level in served.levels:
        assert level.errors == 0 and level.requests == 2 * level.users
        assert level.output_tokens == 8 * level.requests  # EOS ignored: every request streams all its tokens
        assert 0 < level.ttft_ms_p50 <= level.ttft_ms_p95 < level.wall_s * 1000  # the first token comes before the end
        assert 0 < level.itl_ms_p50 <= level.itl_ms_p95
        assert level.tok_s > 0 and level.requests_per_s > 0 and level.server_cpu_s > 0 and level.client_cpu_s > 0
        assert level.server_metrics["llamacpp:tokens_predicted_total"] >= level.output_tokens
    # every prompt starts with the same 16 tokens: the slot's prompt cache serves them from the 2nd request on
    assert 0 < served.levels[0].cache_hit_share < 1
    assert served.flat()["serving.u2.tok_s"] == served.at(2).tok_s


def test_a_failed_measurement_or_a_killed_worker_leaves_no_server(served_q8, gguf_bench, workdir):
    from byoai.isolation import WorkerKilled
    from byoai.tasks.serving import ServerSpec, running_server, serve_in_runtime

    artifact, target, build = served_q8
    before = llama_servers()
    spec = ServerSpec(model=Path(artifact.path) / "model.gguf", threads=1, slots=1, slot_context=64, device="cpu")
    with pytest.raises(RuntimeError, match="the load generator broke"):
        with running_server("llama_cpp", build, spec, workdir / "server.log") as server:
            assert httpx.get(f"{server.url}/health").status_code == 200
            raise RuntimeError("the load generator broke")
    assert llama_servers() == before
    # the worker measuring is killed while its server runs (an OOM kill, a SIGKILL): the kernel ends the server
    long = SERVING.model_copy(update={"users": (1,), "requests_per_user": 200, "new_tokens": 200})
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_failure(serve_in_runtime.fn, artifact, target, "llama_cpp", build, gguf_bench.tokens, long)))
    thread.start()
    deadline = time.monotonic() + 60
    while not (llama_servers() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    (server_pid,) = llama_servers() - before
    worker = int(Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(worker, signal.SIGKILL)
    thread.join(60)
    assert isinstance(outcome[0], WorkerKilled)
    deadline = time.monotonic() + 10
    while llama_servers() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llama_servers() == before


def test_a_pair_is_measured_and_its_greedy_output_checked_token_by_token(served_q8, gguf_bench, workdir):
    from byoai.tasks.serving import evaluation_stream, first_difference, measure_pair, prompts_for

    artifact, target, build = served_q8
    main = Path(artifact.path) / "model.gguf"
    prompts = prompts_for(evaluation_stream(gguf_bench.tokens.path), SERVING, 2, seed=0)
    before = llama_servers()
    # the main model as its own draft: every drafted token is the main model's own greedy choice
    pair = measure_pair("llama_cpp", build, main, main, "itself", prompts, 16, 2, n_max=4, p_min=0.0, log_path=workdir / "pair.log")
    assert llama_servers() == before
    assert pair.drafted > 0 and pair.accepted / pair.drafted == pair.acceptance > 0.5 and pair.draft_size_ratio == 1.0
    assert pair.main_tok_s > 0 and pair.pair_tok_s > 0 and pair.speedup == pair.pair_tok_s / pair.main_tok_s
    assert pair.identical == (pair.first_difference == "")
    # the check itself: the first token that differs, or a shorter output
    assert first_difference([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]) == "prompt 1, token 1: token id 5 alone, 9 with the draft"
    assert first_difference([[1, 2, 3]], [[1, 2]]) == "prompt 0, token 2: token id 3 alone, end with the draft"
    assert first_difference([[1, 2]], [[1, 2]]) == ""


def test_a_draft_with_another_vocabulary_is_refused_at_the_door(served_q8, workdir, write_recipe, gguf_tiny_model, smollm2, tmp_path):
    from transformers import AutoTokenizer

    from byoai.files import folder_sha256
    from byoai.tasks.model import ModelRef
    from tests.conftest import Bench
    from tests.tiny import make_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(64)])  # the vocabulary resized: 49,216 tokens
    tokenizer.save_pretrained(tmp_path / "tok")
    resized = make_tiny_model(tmp_path / "resized", hidden=256, intermediate=512, tokenizer_dir=tmp_path / "tok")
    ref = ModelRef(path=str(resized), sha=folder_sha256(resized), source="test:resized")
    bench = Bench(ref, tmp_path / "bench", n_samples=2, seq_len=32, eval_tokens=256, eval_seq_len=128)
    draft = Path(bench.build("gguf", {"quant_type": "q8_0"}).path) / "model.gguf"
    serving = "{users: [1], requests_per_user: 1, prompt_tokens: 16, new_tokens: 4}"
    evaluation = f"{{perplexity: {{source: {{kind: builtin, split: test}}}}, serving: {serving}}}"
    variants = "[{name: q8, technique: gguf, params: {quant_type: q8_0}}]"
    refused = write_recipe(model=f"{{kind: local, path: {gguf_tiny_model}}}", evaluation=evaluation, variants=variants, speculative=f"{{drafts: [{draft}]}}")
    result = CliRunner().invoke(app, ["validate", str(refused)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "speculative.drafts" in text and "another vocabulary than the model (the draft has 49216 tokens, the model 49152)" in text
    same = Path(served_q8[0].path) / "model.gguf"  # the same tokenizer: accepted
    accepted = write_recipe(model=f"{{kind: local, path: {gguf_tiny_model}}}", evaluation=evaluation, variants=variants, speculative=f"{{drafts: [{same}]}}")
    assert load_recipe(accepted).speculative.drafts == (str(same),)
    no_serving = write_recipe(model=f"{{kind: local, path: {gguf_tiny_model}}}", variants=variants, speculative="{drafts: auto}")
    result = CliRunner().invoke(app, ["validate", str(no_serving)])
    assert result.exit_code == 2 and "speculative: add evaluation.serving" in " ".join(result.output.split())


def _failure(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def _candidate(name: str, size: float, serving: dict[int, tuple[float, float, float]] | None, note: str = "") -> Candidate:
    return Candidate(
        variant=name, version=name, runtime="llama_cpp" if serving is not None else "transformers", ppl=10.0, ppl_delta_pct=1.0,
        size_mb=size, decode_tok_s=10.0, serving_note=note,
        serving={str(u): {"ttft_ms_p95": t, "itl_ms_p95": i, "tok_s": s} for u, (t, i, s) in (serving or {}).items()},
    )


def test_the_slo_gates_and_capacity_ranks_by_users_served_within_it():
    slo = SloSpec(users=4, p95_ttft_ms=500, p95_itl_ms=50)
    small_slow = _candidate("small", 50, {1: (100, 20, 40), 4: (900, 60, 90), 8: (2000, 90, 100)})
    big_fast = _candidate("big", 90, {1: (80, 10, 60), 4: (300, 30, 150), 8: (450, 45, 200)})
    mid = _candidate("mid", 70, {1: (80, 10, 60), 4: (300, 30, 160), 8: (900, 70, 210)})
    dense = _candidate("dense", 10, None, "no serving runtime (transformers has no server)")
    # smallest under an SLO: the smaller files miss it (at 4 users, or not served at all)
    winner, rows = decide([small_slow, big_fast, mid, dense], None, PromotionSpec(gate=GateSpec(), objective="smallest", slo=slo))
    by = {r["variant"]: r for r in rows}
    assert winner == "mid"
    assert by["small"]["reason"] == "slo failed at 4 users: p95 TTFT 900 ms > 500 ms, p95 ITL 60 ms > 50 ms"
    assert by["dense"]["reason"] == "slo failed: no serving runtime (transformers has no server)" and by["dense"]["slo_users"] == 0
    assert by["big"]["slo"] == "meets the SLO up to 8 users" and by["mid"]["slo"] == "meets the SLO up to 4 users"
    # capacity: the most users within the SLO's percentiles (big holds 8), ties to throughput
    capacity = PromotionSpec(objective="capacity", slo=slo)
    winner, rows = decide([small_slow, big_fast, mid, dense], None, capacity)
    assert winner == "big" and rows[0]["variant"] == "big" and "users within the SLO" in rows[0]["reason"]
    twin = _candidate("twin", 95, {1: (80, 10, 60), 4: (300, 30, 150), 8: (450, 45, 250)})
    assert decide([big_fast, twin], None, capacity)[0] == "twin"
    # a champion measured without a serving profile counts as capacity 0
    old = _candidate("old", 5, {}, "")
    winner, rows = decide([big_fast], old, capacity)
    assert winner == "big" and "capacity 0" in rows[0]["reason"]


def test_a_bad_serving_field_or_an_unmeasured_slo_is_a_recipe_error(write_recipe):
    bad = write_recipe(evaluation="{perplexity: {source: {kind: builtin, split: test}}, serving: {users: [8, 1]}}")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "evaluation.serving.users" in result.output and "increasing order" in result.output
    unmeasured = write_recipe(promotion="{objective: capacity, slo: {users: 8}}")
    result = CliRunner().invoke(app, ["validate", str(unmeasured)])
    assert result.exit_code == 2 and "promotion.slo: add evaluation.serving" in " ".join(result.output.split())
    other = write_recipe(evaluation="{perplexity: {source: {kind: builtin, split: test}}, serving: {users: [1, 4]}}", promotion="{slo: {users: 8}}")
    result = CliRunner().invoke(app, ["validate", str(other)])
    assert result.exit_code == 2 and "promotion.slo.users: 8 is not a level of evaluation.serving.users [1, 4]" in " ".join(result.output.split())


def test_a_recipe_promotes_by_serving_slo_and_byoai_serve_answers_an_openai_client(workdir, write_recipe, gguf_tiny_model):
    from openai import OpenAI

    from byoai.flows.optimize import run_optimize

    recipe = load_recipe(write_recipe(
        model=f"{{kind: local, path: {gguf_tiny_model}}}",
        targets="[cpu-x86]",
        evaluation="""
  perplexity: {source: {kind: builtin, split: test}, max_tokens: 512, seq_len: 128}
  latency: {prompt_tokens: 16, new_tokens: 4, warmup: 0, repeats: 1}
  serving: {users: [1, 2], requests_per_user: 2, prompt_tokens: 32, new_tokens: 8, shared_prefix_tokens: 16}""",
        variants="""[{name: baseline, technique: baseline}, {name: q4, technique: gguf, params: {quant_type: q4_0}},
          {name: q8, technique: gguf, params: {quant_type: q8_0}, speculative: {drafts: [q4], n_max: 4, p_min: 0.0}}]""",
        promotion="{gate: {max_ppl_increase_pct: 50}, objective: capacity, slo: {users: 2, p95_ttft_ms: 60000, p95_itl_ms: 60000}}",
    ))
    summary = run_optimize(recipe)
    rows = {r.variant: r for r in summary.results}
    assert rows["q8"].serving["serving.u2.tok_s"] > 0 and rows["q4"].serving["serving.u1.ttft_ms_p95"] > 0 and not rows["baseline"].serving
    decisions = {d["variant"]: d for d in summary.decisions}
    assert decisions["baseline"]["reason"] == "slo failed: no serving runtime (transformers has no server)"
    assert decisions["q8"]["slo"] == decisions["q4"]["slo"] == "meets the SLO up to 2 users"
    champion = next(d for d in summary.decisions if d["champion"])
    assert champion["variant"] in {"q8", "q4"} and "first champion: best users within the SLO" in champion["reason"]
    client = mlflow_client(workdir)
    run = client.get_run(rows["q8"].run_id)
    assert run.data.tags["byoai.serving"] == "measured" and run.data.params["serving.slots"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "serving.tok_s")] == [1, 2]
    assert client.get_run(rows["baseline"].run_id).data.tags["byoai.serving"].startswith("no serving runtime")
    report = {a.path for a in client.list_artifacts(summary.parent_run_id, "report")}
    assert "report/serving-cpu-x86.png" in report
    # q8 paired with q4 as its draft and with n-gram lookup: each measured against q8 alone; a pair is
    # a version of its own only when it is faster with the same greedy output, else a row says why not
    for name in ("q8-spec-q4", "q8-spec-ngram"):
        pair = next(r for r in summary.results if r.variant == name)
        if pair.status == "finished":
            assert "identical greedy output" in pair.reason and pair.version and pair.profile["speculative.accepted"] > 0
            version = client.get_model_version("tiny", pair.version)
            assert version.tags["byoai.draft_of"] == "q8" and "--spec-draft-n-max 4" in version.tags["byoai.server_flags"]
            files = {a.path for a in client.list_artifacts(version.tags["byoai.run_id"], "model")}
            assert "model/server-args.json" in files and ("model/draft.gguf" in files) == (name == "q8-spec-q4")
        else:
            assert pair.status == "skipped" and pair.reason.startswith("not registered: "), pair.reason
            assert "acceptance" in pair.reason and any(why in pair.reason for why in ("differs from q8 alone (prompt", "not measurably faster than q8 alone",
                                                                       "accepted none of the draft's tokens"))
            assert pair.profile["speculative.identical"] in (0.0, 1.0) and (pair.profile["speculative.drafted"] > 0 or name == "q8-spec-ngram")

    # byoai serve: the champion behind an API key, in the foreground until SIGTERM
    env = os.environ | {"BYOAI_SERVE_API_KEY": "test-key-123", "BYOAI_HOME": str(workdir / ".byoai")}
    before = llama_servers()
    serve = subprocess.Popen([sys.executable, "-m", "byoai.cli", "serve", "tiny", "--target", "cpu-x86"], cwd=workdir, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, said = None, []
        for line in serve.stdout:
            said.append(line)
            if " at http://127.0.0.1:" in line:
                url = line.split(" at ", 1)[1].split()[0]
                break
        assert url and url.endswith("/v1"), "".join(said)[-3000:]
        stream = OpenAI(base_url=url, api_key="test-key-123").completions.create(model="tiny", prompt="def main():", max_tokens=8, stream=True)
        pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
        assert len(pieces) >= 1
        anonymous = httpx.post(f"{url}/completions", json={"prompt": "x", "max_tokens": 2})
        assert anonymous.status_code == 401
        served = llama_servers() - before
        assert len(served) == 1
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
    assert llama_servers() == before
    # --detach, then --stop; anonymous serving is refused unless asked for on loopback
    detached = CliRunner().invoke(app, ["serve", "tiny", "--detach"], env={"BYOAI_SERVE_API_KEY": "k"})
    assert detached.exit_code == 0 and "stop it with: byoai serve --stop tiny" in detached.output
    assert len(llama_servers() - before) == 1
    stopped = CliRunner().invoke(app, ["serve", "--stop", "tiny"])
    assert stopped.exit_code == 0 and llama_servers() == before
    refused = CliRunner().invoke(app, ["serve", "tiny", "--no-auth", "--host", "0.0.0.0"], env={"BYOAI_SERVE_API_KEY": ""})
    assert refused.exit_code == 2 and "loopback host only" in " ".join(refused.output.split())
