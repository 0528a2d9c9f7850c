"""Scale benchmark: byoai on random-weight Llama-shaped models from 135M to 8B, on this worker.

    python bench/scale.py [--sizes 135m,1b,3b,8b]   (default: all four, ~hours on 2 cores)
    python bench/scale.py --quick                   (a ~300M shape, two variants: what CI runs)

Each size: a model of that real shape (SmolLM2-135M; Llama-3.2-1B, Llama-3.2-3B and
Llama-3.1-8B bodies with SmolLM2's 49,152-token tokenizer) is generated on the fly with random
weights in bf16 safetensors (quality is meaningless, time and memory are real), then one
`byoai run` measures reference, gguf q8_0, gguf q4_k_m + imatrix, gguf_mixed at q4_k_m's size,
gptq W4 g128 (llm-compressor) and onnx int4. Printed per stage: wall time and peak memory (per
process: VmHWM / ru_maxrss of each build and evaluation worker), both also over the model's bf16
size, the memory plan's estimate beside the measured peak, and the exponent of wall time against
parameters across the sizes measured.

Resumable per size: each size's numbers land in bench/results/scale/<size>.json and a size with
a file is not run again (delete it to re-measure); a run that died resumes from byoai's cache in
its own BYOAI_HOME. `--remeasure gptq-w4-g128[,...]` runs only those variants of each size again
(after a fix) and replaces their rows in the size's file, which names the run of each row. After
a size is recorded its model, variants and MLflow store are deleted (at 8B that is ~40 GB).
Registered versions point at the built folders (--no-register), so no artifact is copied into the
MLflow store.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "scale"
WORK = Path(os.environ.get("BYOAI_HOME", ROOT / ".byoai")).resolve() / "scale"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"

# name -> (hidden, layers, intermediate, heads, kv heads, tied embeddings)
SHAPES = {
    "135m": (576, 30, 1536, 9, 3, True),
    "300m": (1024, 16, 4096, 16, 8, True),
    "1b": (2048, 16, 8192, 32, 8, True),
    "3b": (3072, 28, 8192, 24, 8, True),
    "8b": (4096, 32, 14336, 32, 8, False),
}
Q4_K_M_BITS = 4.89  # byoai.memory.GGUF_BITS: the mixed file's budget is q4_k_m's size


def generate(name: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A random-weight Llama body of that shape, bf16 safetensors, SmolLM2's tokenizer beside it."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, intermediate, heads, kv_heads, tied = SHAPES[name]
    config = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # bf16 on meta first: an f32 8B body is 29.5 GB
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        model.model.rotary_emb.__init__(config)  # its inv_freq buffer: to_empty left it uninitialized
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="2GB")
    del model
    for item in tokenizer_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy2(item, tmp / item.name)
    tmp.rename(folder)
    return folder


def recipe_for(name: str, model: Path, params: int, quick: bool, only: list[str] | None = None) -> Path:
    text = (f"{{kind: file, path: {WIKITEXT / 'valid.txt'}}}", f"{{kind: file, path: {WIKITEXT / 'test.txt'}}}") if WIKITEXT.is_dir() else (
        "{kind: builtin, split: train}", "{kind: builtin, split: test}")
    samples, seq = (4, 128) if name == "8b" or quick else (8, 256)
    mixed_mb = params * Q4_K_M_BITS / 8 / 1e6
    group = 128 if SHAPES[name][0] % 128 == 0 else 64
    variants = ["{name: baseline, technique: baseline}", "{name: gguf-q8_0, technique: gguf, params: {quant_type: q8_0}}"]
    if not quick:
        variants += [
            "{name: gguf-q4_k_m-imatrix, technique: gguf, params: {quant_type: q4_k_m, imatrix: true}}",
            f"{{name: gguf-mixed-at-q4_k_m, technique: gguf_mixed, params: {{max_size_mb: {mixed_mb:.0f}, candidates: [q4_0, q5_0, q8_0], windows: 2}}}}",
            # SmolLM2-135M's 576-wide layers take no group of 128 (64 divides all its widths)
            f"{{name: gptq-w4-g{group}, technique: gptq, params: {{bits: 4, group_size: {group}}}}}",
            "{name: onnx-int4, technique: onnx, params: {precision: int4}}",
        ]
    if only:
        variants = [v for v in variants if any(f"name: {n}," in v for n in only)]
    path = WORK / f"scale-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"name: scale-{name}\nmodel: {{kind: local, path: {model}}}\n"
        f"calibration: {{source: {text[0]}, n_samples: {samples}, seq_len: {seq}}}\n"
        f"evaluation:\n  perplexity: {{source: {text[1]}, max_tokens: 1024, seq_len: 512}}\n"
        "  latency: {prompt_tokens: 32, new_tokens: 16, warmup: 0, repeats: 1}\n"
        "targets: [cpu-x86]\npromotion: {gate: {max_ppl_increase_pct: 1000}, objective: smallest}\n"
        "variants:\n" + "".join(f"  - {v}\n" for v in variants)
    )
    return path


def measure(name: str, quick: bool, only: list[str] | None = None) -> dict:
    """One size: generate, run, read every stage's numbers back from MLflow, clean up."""
    from byoai.plan import model_shape
    from byoai.recipe import load_recipe

    home = WORK / name
    os.environ["BYOAI_HOME"] = str(home)
    os.environ["BYOAI_REGISTER_COPIES"] = "false"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from byoai.recipe import EmbeddedModel
    from byoai.settings import Settings
    from byoai.tasks.model import resolve_model

    smollm2 = resolve_model.fn(EmbeddedModel(), str(Settings().models_dir()))
    started = time.perf_counter()
    model = generate(name, home / "model", Path(smollm2.path))
    generate_s = time.perf_counter() - started
    bf16_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    recipe = load_recipe(recipe_for(name, model, bf16_bytes // 2, quick, only))
    shape = model_shape(recipe)

    from byoai.flows.optimize import run_optimize

    started = time.perf_counter()
    summary = run_optimize(recipe)
    run_s = time.perf_counter() - started
    stages = [st | {"mlflow_run": summary.parent_run_id} for st in stage_rows(summary)]
    record = {
        "size": name, "params": shape.params, "bf16_gb": bf16_bytes / 1e9, "generate_s": round(generate_s, 1),
        "run_s": round(run_s, 1), "mlflow_run": summary.parent_run_id, "stages": stages,
        "not_measured": [f"{r.variant}: {r.status}: {r.reason}" for r in summary.results if r.status != "finished"],
    }
    return record


def stage_rows(summary) -> list[dict]:
    from byoai.tasks.tracking import client

    mlflow = client(summary.tracking_uri)
    rows = []
    for r in summary.results:
        if r.status != "finished":
            continue
        metrics = mlflow.get_run(r.run_id).data.metrics
        rows.append({
            "variant": r.variant, "runtime": r.runtime, "size_mb": r.size_mb, "ppl": r.ppl,
            "build_s": metrics.get("build_s", 0.0), "evaluate_s": r.profile.get("evaluate_s", 0.0),
            "build_peak_mb": metrics.get("build_peak_mem_mb", 0.0), "evaluate_peak_mb": r.profile.get("peak_mem_mb", 0.0),
            "plan_peak_mb": metrics.get("plan.peak_mem_mb", 0.0),
        })
    return rows


def print_table(records: list[dict]) -> list[tuple[str, bool]]:
    print("| size | params | variant | runtime | build s | eval s | build peak GB | eval peak GB | peak / bf16 | plan GB | plan / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    checks = []
    for rec in records:
        for st in rec["stages"]:
            peak = max(st["build_peak_mb"], st["evaluate_peak_mb"]) / 1e3
            ratio = st["plan_peak_mb"] / 1e3 / peak if peak else float("nan")
            print(f"| {rec['size']} | {rec['params'] / 1e9:.2f} B | {st['variant']} | {st['runtime']} | {st['build_s']:.0f} | {st['evaluate_s']:.0f} | "
                  f"{st['build_peak_mb'] / 1e3:.2f} | {st['evaluate_peak_mb'] / 1e3:.2f} | {peak / rec['bf16_gb']:.2f} | {st['plan_peak_mb'] / 1e3:.2f} | {ratio:.2f} |")
        largest = max((max(s["build_peak_mb"], s["evaluate_peak_mb"]) / 1e3 for s in rec["stages"]), default=0.0)
        print(f"\n{rec['size']}: run {rec['run_s'] / 60:.1f} min (MLflow run {rec['mlflow_run']}), largest per-process peak {largest:.2f} GB "
              f"= {largest / rec['bf16_gb']:.2f} x bf16 ({rec['bf16_gb']:.2f} GB); not measured: {rec['not_measured'] or 'none'}\n")
        if rec["params"] >= 1e9:  # below, the ~0.7 GB of Python and torch in every process dominates
            checks.append((f"{rec['size']}: largest per-process peak <= 1.25 x the bf16 size ({largest / rec['bf16_gb']:.2f})", largest <= 1.25 * rec["bf16_gb"]))
        ratios = [s["plan_peak_mb"] / max(s["build_peak_mb"], s["evaluate_peak_mb"]) for s in rec["stages"] if s["plan_peak_mb"]]
        checks.append((f"{rec['size']}: plan within ±25 % of every measured peak (plan / measured {min(ratios, default=0):.2f}–{max(ratios, default=0):.2f})",
                       bool(ratios) and all(0.75 <= r <= 1.25 for r in ratios)))
    if len(records) >= 2:
        xs = [math.log(r["params"]) for r in records]
        ys = [math.log(r["run_s"]) for r in records]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        print(f"wall time ~ params^{slope:.2f} across {', '.join(r['size'] for r in records)}")
        checks.append((f"wall time grows at most linearly with parameters (exponent {slope:.2f} <= 1)", slope <= 1.0))
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,1b,3b,8b")
    parser.add_argument("--quick", action="store_true", help="a ~300M shape, two variants (what CI runs)")
    parser.add_argument("--remeasure", default="", help="variant names: run only these again and replace their rows")
    args = parser.parse_args()
    only = [v for v in args.remeasure.split(",") if v]
    sizes = ["300m"] if args.quick else args.sizes.split(",")
    records = []
    for name in sizes:
        result = (WORK if args.quick else RESULTS) / f"{name}.json"
        if result.is_file() and not args.quick and not only:
            records.append(json.loads(result.read_text()))
            continue
        record = measure(name, args.quick, only)
        if only and result.is_file():  # the new rows replace theirs in what was measured before
            before = json.loads(result.read_text())
            rows = {st["variant"]: st for st in before["stages"]} | {st["variant"]: st for st in record["stages"]}
            gone = [n for n in before["not_measured"] if n.split(":")[0] not in only] + [n for n in record["not_measured"]]
            record = before | {"stages": list(rows.values()), "not_measured": gone}
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(record, indent=2))
        records.append(record)
        shutil.rmtree(WORK / name, ignore_errors=True)  # the model, its variants and MLflow store
    print_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
