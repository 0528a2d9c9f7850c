"""One installed name: the wheel holds only `byoai` (flows, tasks and recipes live under it), and
an installed copy works from a folder outside the repository; the bench scripts cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """byoai built as a wheel and installed into a folder of its own (its dependencies from this env)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)], check=True)
    (wheel,) = out.glob("byoai-*.whl")
    site = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True)
    return wheel


def test_the_wheel_installs_only_byoai_at_the_top_level(installed):
    top = {name.split("/")[0] for name in zipfile.ZipFile(installed).namelist()}
    assert top == {"byoai", f"{installed.name.split('-')[0]}-{installed.name.split('-')[1]}.dist-info"}
    names = set(zipfile.ZipFile(installed).namelist())
    assert {"byoai/tasks/build.py", "byoai/flows/optimize.py", "byoai/recipes/targets/cpu-x86.yaml", "byoai/recipes/lm_eval/pydoc_cloze.jsonl"} <= names


def test_outside_the_repository_only_byoai_imports_and_byoai_run_works(installed, tmp_path, tiny_model):
    site = installed.parent / "site"
    env = os.environ | {"PYTHONPATH": str(site), "BYOAI_HOME": str(tmp_path / ".byoai")}
    env.pop("MLFLOW_TRACKING_URI", None)
    probe = (
        "import importlib.util as u, byoai.tasks.build, byoai.flows.optimize, byoai.recipes; "
        "print([m for m in ('tasks', 'flows', 'recipes') if u.find_spec(m)], byoai.recipes.TARGETS_DIR)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("[] ") and str(site) in out
    (tmp_path / "r.yaml").write_text(
        f"name: outside\nmodel: {{kind: local, path: {tiny_model}}}\n"
        "calibration: {source: {kind: builtin, split: train}, n_samples: 2, seq_len: 32}\n"
        "evaluation: {perplexity: {source: {kind: builtin, split: test}, max_tokens: 128, seq_len: 64}, "
        "latency: {prompt_tokens: 8, new_tokens: 2, warmup: 0, repeats: 1}}\n"
        "targets: [cpu-x86]\nvariants: [{name: rtn, technique: rtn, params: {group_size: 32}}]\n"
        "promotion: {gate: {max_ppl_increase_pct: 100}}\n"
    )
    run = subprocess.run([sys.executable, "-m", "byoai.cli", "run", "r.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "champion-cpu-x86: version 1" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script, expect", [
    ("bench/orchestration.py", ["pipeline / plain", "warm / cold"]),
    ("bench/runtimes.py", ["× transformers fp32", "llama.cpp f32 ppl", "WINNER cpu-x86: fastest decode", "onnxruntime_genai", "champion-cpu-x86"]),
    ("bench/scale.py", ["| 300m | 0.", "| gguf-q8_0 | llama_cpp |", "largest per-process peak", "plan within"]),
    ("bench/auto.py", ["exhaustive: 3 candidates", "| smallest-within-10pct | gguf-", "auto wall time"]),
    ("bench/serving.py", ["| q8_0 | ", "throughput at 2 users / at 1 user", "SLO (promotion.slo): 2 users", "champion-cpu-x86: q8_0", "| q8_0 | ngram |"]),
    ("bench/quality_per_byte.py", ["| mixed-at-q4_0 | gguf_mixed |", "| qat-q4_0 | qat+gguf |", "at or below q4_0's size", "without q4_1: mixed-at-q4_0"]),
])
def test_bench_scripts_run_in_quick_mode(script, expect, tmp_path):
    env = os.environ | {"BYOAI_HOME": str(tmp_path / ".byoai")}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, script, "--quick"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in expect:
        assert text in done.stdout, done.stdout[-3000:]


def test_every_bench_script_has_a_quick_mode_run_above():
    scripts = {str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py") if p.name != "plain_demo.py"}
    source = Path(__file__).read_text()
    assert all(f'("{script}", [' in source for script in scripts), scripts
