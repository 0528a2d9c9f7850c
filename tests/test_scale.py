"""byoai at size, on tiny models: the memory plan skips with numbers, a killed worker fails one
variant, the checkpoint's dtype is kept, a reference measured in llama.cpp gates, and a killed or
terminated `byoai run` leaves no RUNNING parent run and no server behind. `byoai run` runs as the
user's subprocess here, so signals and the kernel act on real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from tests.tiny import make_tiny_model

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "head_dim": 128,
}


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, smollm2) -> Path:
    """A 2-layer Llama saved in bfloat16 with SmolLM2's tokenizer (llama.cpp's converter knows it)."""
    return make_tiny_model(tmp_path_factory.mktemp("bf16") / "model", hidden=256, intermediate=512, tokenizer_dir=Path(smollm2.path), dtype="bfloat16")


def gguf_recipe(workdir: Path, model: Path, variants: str, name: str = "scale") -> Path:
    """A recipe on a target that ships only llama.cpp: the gate's reference is the model's own bf16 GGUF."""
    (workdir / "targets").mkdir(exist_ok=True)
    (workdir / "targets" / "cpu-gguf.yaml").write_text(
        "name: cpu-gguf\ndevice: cpu\ntechniques: [baseline, gguf, distill, qat]\nruntimes: {llama_cpp: {}}\n"
    )
    path = workdir / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        model: {{kind: local, path: {model}}}
        calibration: {{source: {{kind: builtin, split: train}}, n_samples: 4, seq_len: 64}}
        evaluation:
          perplexity: {{source: {{kind: builtin, split: test}}, max_tokens: 256, seq_len: 128}}
          latency: {{prompt_tokens: 8, new_tokens: 4, warmup: 0, repeats: 1}}
        targets: [cpu-gguf]
        promotion: {{gate: {{max_ppl_increase_pct: 1000}}, objective: smallest}}
        variants:
        """) + textwrap.indent(textwrap.dedent(variants), "  "))
    return path


def start_run(recipe: Path, workdir: Path, **env: str) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    environment |= {"BYOAI_HOME": str(workdir / ".byoai"), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "byoai.cli", "run", str(recipe)], cwd=workdir, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def build_worker(run: subprocess.Popen, technique: str, timeout: float = 300) -> psutil.Process:
    """The worker process building `technique` for this run (named byoai-<technique>), once it has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(run.pid).children(recursive=True):
            try:
                if child.name() == f"byoai-{technique}"[:15]:
                    return child
            except psutil.NoSuchProcess:
                continue
        assert run.poll() is None, run.stdout.read()
        time.sleep(0.5)
    raise AssertionError(f"no {technique} build worker within {timeout} s")


def child_runs(workdir: Path) -> dict[str, dict[str, str]]:
    from byoai.tasks.tracking import client

    mlflow = client(f"sqlite:///{workdir / '.byoai' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    return {
        r.data.tags.get("byoai.variant", ""): r.data.tags | {"status": r.info.status, "metrics": r.data.metrics}
        for r in mlflow.search_runs(experiments) if "mlflow.parentRunId" in r.data.tags
    }


def parent_runs(workdir: Path):
    from byoai.tasks.tracking import client

    mlflow = client(f"sqlite:///{workdir / '.byoai' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    return mlflow.search_runs(experiments, "tags.`byoai.kind` = 'flow'")


VARIANTS = """\
- {name: q8, technique: gguf, params: {quant_type: q8_0}}
- {name: q4, technique: gguf, params: {quant_type: q4_0}}
- {name: wide-distill, stages: [{technique: distill, params: {steps: 2, batch_size: 4096}}, {technique: gguf, params: {quant_type: q8_0}}]}
- {name: slow-qat, stages: [{technique: qat, params: {steps: 100000, batch_size: 1}}, {technique: gguf, params: {quant_type: q4_0}}]}
"""


def test_plan_skip_and_a_killed_worker_fail_one_variant_each_and_llama_cpp_gates(bf16_model, workdir):
    from byoai.plan import capacity_here, model_shape, plan_memory
    from byoai.recipe import load_recipe

    recipe = gguf_recipe(workdir, bf16_model, VARIANTS)
    parsed = load_recipe(recipe)
    planned = plan_memory(parsed, model_shape(parsed), list(parsed.targets), lambda t: capacity_here())
    peaks = {p.variant: p.peak_host for p in planned.variants}
    others = max(v for k, v in peaks.items() if k != "wide-distill")
    assert peaks["wide-distill"] > others
    limit_gb = (peaks["wide-distill"] + others) / 2 / 1e9  # room for all but the wide batch
    run = start_run(recipe, workdir, BYOAI_MEMORY_GB=f"{limit_gb:.3f}")
    worker = build_worker(run, "qat")
    time.sleep(2)
    worker.send_signal(signal.SIGKILL)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output
    runs = child_runs(workdir)
    assert runs["wide-distill"]["byoai.status"] == "skipped"
    assert runs["wide-distill"]["byoai.reason"].startswith("needs ~") and f"this worker has {limit_gb:.1f} GB" in runs["wide-distill"]["byoai.reason"]
    assert runs["slow-qat"]["byoai.status"] == "failed" and "killed by SIGKILL (peak " in runs["slow-qat"]["byoai.reason"]
    assert runs["q8"]["byoai.status"] == runs["q4"]["byoai.status"] == "finished"
    assert "champion-cpu-gguf: version" in output
    # the gate's reference was the model's own bf16 GGUF in llama.cpp, and the report says so
    (parent,) = parent_runs(workdir)
    assert parent.data.tags["byoai.reference.cpu-gguf"] == "llama_cpp"
    report = (workdir / ".byoai" / "mlartifacts").rglob("report.md")
    assert "| llama_cpp |" in next(report).read_text()
    assert "reference @ cpu-gguf [llama_cpp]: done" in output
    # the plan's estimate is logged beside the measured peaks
    assert runs["q8"]["metrics"]["plan.peak_mem_mb"] > 0 and runs["q8"]["metrics"]["build_peak_mem_mb"] > 0 and runs["q8"]["metrics"]["peak_mem_mb"] > 0


def test_a_bf16_checkpoint_stays_bf16_through_baseline_rtn_and_gguf(bf16_model, tmp_path):
    from byoai.files import folder_sha256, folder_size_bytes
    from byoai.tasks.model import ModelRef
    from tests.conftest import Bench

    ref = ModelRef(path=str(bf16_model), sha=folder_sha256(bf16_model), source="test:bf16")
    bench = Bench(ref, tmp_path, n_samples=4, seq_len=64, eval_tokens=256, eval_seq_len=128)
    model_bytes = sum(f.stat().st_size for f in bf16_model.glob("*.safetensors"))
    baseline = bench.build("baseline")
    assert baseline.size_bytes == folder_size_bytes(bf16_model)
    metrics = bench.evaluate(baseline)
    assert metrics.profile["weights_mb"] == pytest.approx(model_bytes / 1e6, rel=0.02)  # held in bf16, not float32
    rtn = bench.build("rtn", {"bits": 4, "group_size": 32})
    config = json.loads((Path(rtn.path) / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    gguf = bench.build("gguf", {"quant_type": "bf16"})
    assert gguf.facts["converted_as"] == "bf16" and gguf.facts["peak_mem_mb"] > 0
    assert (Path(gguf.path) / "model.gguf").stat().st_size < 1.1 * model_bytes  # not an f32 file


def test_sigterm_stops_a_run_in_seconds_a_killed_flow_is_repaired_and_a_rerun_reuses_what_finished(bf16_model, workdir):
    q8, slow_qat = VARIANTS.splitlines()[0] + "\n", VARIANTS.splitlines()[3] + "\n"
    # SIGTERM (timeout, a Prefect cancellation, Kubernetes) during a long build
    run = start_run(gguf_recipe(workdir, bf16_model, q8 + slow_qat), workdir)
    build_worker(run, "qat")
    server = json.loads((workdir / ".byoai" / "prefect-server.pid").read_text())["pid"]
    started = time.monotonic()
    run.send_signal(signal.SIGTERM)
    output, _ = run.communicate(timeout=60)
    assert time.monotonic() - started < 15, output
    assert run.returncode == 128 + signal.SIGTERM and "terminated by signal SIGTERM" in output
    (terminated,) = parent_runs(workdir)
    assert terminated.info.status == "FAILED" and "terminated by signal" in terminated.data.tags["byoai.failure"]
    assert not psutil.pid_exists(server) or psutil.Process(server).status() == psutil.STATUS_ZOMBIE
    # SIGKILL to the flow (what the kernel's OOM killer does): nothing of byoai runs to record it
    run = start_run(gguf_recipe(workdir, bf16_model, slow_qat), workdir)
    worker = build_worker(run, "qat")
    server = json.loads((workdir / ".byoai" / "prefect-server.pid").read_text())["pid"]
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    worker.wait(30)  # the worker dies with its parent (PR_SET_PDEATHSIG)
    (killed,) = [r for r in parent_runs(workdir) if r.info.run_id != terminated.info.run_id]
    assert killed.info.status == "RUNNING" and psutil.pid_exists(server)
    result = CliRunner().invoke(__import__("byoai.cli", fromlist=["app"]).app, ["runs"], env={"BYOAI_HOME": str(workdir / ".byoai")})
    assert "gone (byoai runs --repair)" in result.output
    # the next start marks it FAILED with the reason, stops the stale server, and finds the
    # reference and q8 of the terminated run in the cache
    again = start_run(gguf_recipe(workdir, bf16_model, q8), workdir)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    assert "FAILED: the byoai process that ran it" in output
    assert not psutil.pid_exists(server) or psutil.Process(server).status() == psutil.STATUS_ZOMBIE
    assert not [r for r in parent_runs(workdir) if r.info.status == "RUNNING"]
    logs = "".join(p.read_text() for p in (workdir / ".byoai" / "logs").glob("scale-*.log"))
    assert "Cached" in logs


CGROUP = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(os.geteuid() != 0 or not (CGROUP / "memory.limit_in_bytes").is_file(), reason="needs root and the cgroup v1 memory controller")
def test_an_allocation_past_a_cgroup_limit_fails_only_that_variant(bf16_model, workdir):
    group = CGROUP / f"byoai-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(4 * 10**9))
        # a batch whose logits alone take ~10 GB: more than the group's 4 GB, far less than the plan's 200
        wide = VARIANTS.splitlines()[2].replace("batch_size: 4096", "batch_size: 200")
        recipe = gguf_recipe(workdir, bf16_model, VARIANTS.splitlines()[0] + "\n" + wide + "\n")
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
        # the plan believes the machine is big: the kernel, not the plan, stops the wide batch
        environment |= {"BYOAI_HOME": str(workdir / ".byoai"), "HF_HUB_OFFLINE": "1", "BYOAI_MEMORY_GB": "200"}
        run = subprocess.run(
            [sys.executable, "-m", "byoai.cli", "run", str(recipe)], cwd=workdir, env=environment, capture_output=True, text=True,
            timeout=600, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
        )
        assert run.returncode == 0, run.stdout + run.stderr
        runs = child_runs(workdir)
        assert runs["wide-distill"]["byoai.status"] == "failed"
        assert "killed by the operating system: out of memory (peak " in runs["wide-distill"]["byoai.reason"]
        assert "limit 4.0 GB" in runs["wide-distill"]["byoai.reason"]
        assert runs["q8"]["byoai.status"] == "finished" and "champion-cpu-gguf: version" in run.stdout
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            psutil.Process(int(pid)).kill()
        time.sleep(0.5)
        group.rmdir()


def test_plan_with_a_model_config_needs_no_weights(tmp_path):
    from byoai.cli import app

    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_70B))
    demo = Path(__file__).parent.parent / "recipes" / "demo.yaml"
    result = CliRunner().invoke(app, ["plan", str(demo), "--target", "cuda-h100", "--model-config", str(config)])
    assert result.exit_code == 0, result.output
    assert "70.55 B parameters in bfloat16" in result.output
    assert "target cuda-h100 (its profile's memory_gb/device_memory_gb) has 256.0 GB host RAM, GPU 80.0 GB" in result.output
    result = CliRunner().invoke(app, ["plan", str(demo), "--model-config", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "file not found" in result.output


def test_the_plan_runs_heavy_steps_one_at_a_time_when_they_would_not_fit_together(bf16_model, workdir):
    from byoai.memory import Capacity
    from byoai.plan import model_shape, plan_memory
    from byoai.recipe import load_recipe

    parsed = load_recipe(gguf_recipe(workdir, bf16_model, VARIANTS.splitlines()[0] + "\n" + VARIANTS.splitlines()[1] + "\n"))
    shape = model_shape(parsed)
    roomy = plan_memory(parsed, shape, list(parsed.targets), lambda t: Capacity(host=10**12, device=None, source="test"), max_workers=3)
    largest = max(p.peak_host for p in roomy.variants)
    assert roomy.max_workers == 3 and not any("one at a time" in note for note in roomy.notes)
    tight = plan_memory(parsed, shape, list(parsed.targets), lambda t: Capacity(host=int(1.5 * largest), device=None, source="test"), max_workers=3)
    assert tight.max_workers == 1 and "heavy steps run one at a time" in tight.notes[-1]
