"""Runtimes benchmark: every variant measured in the runtime it ships in, in one flow run.

    python bench/runtimes.py [RECIPE]        (default: bench/recipes/smollm2-runtimes.yaml)
    python bench/runtimes.py --quick         (bench/recipes/quick-runtimes.yaml: what CI runs, ~2 min)

Runs the recipe (a real `byoai run`: Prefect, MLflow, registry) and prints the table and the
ratios measured in that same run:
  - each variant's batch-1 decode over transformers fp32's, on the same target;
  - native build over portable build (cpu-x86 / cpu-x86-avx2), per GGUF variant;
  - decode over the bandwidth bound;
the winning runtime per objective (overall and within +5 % ppl); and checks the issues' numbers: the best variant within +5 % ppl decodes >= 5x transformers fp32;
llama.cpp f32 perplexity equals transformers fp32's within 0.1 %; imatrix makes q4_k_m, iq4_nl
and q3_k_m no worse; the native build decodes faster than the portable one; ONNX Runtime GenAI fp32 equals
transformers fp32 within 0.1 % and its int8 is within 2 %.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(recipe_path: str) -> int:
    from byoai.recipe import load_recipe
    from byoai.flows.optimize import run_optimize

    recipe = load_recipe(recipe_path)
    started = time.perf_counter()
    summary = run_optimize(recipe)
    minutes = (time.perf_counter() - started) / 60
    rows = [r for r in summary.results if r.status == "finished"]
    by = {(r.variant, r.target, r.runtime): r for r in rows}
    targets = [t.name for t in recipe.targets]
    native, portable = (targets + [None])[:2]

    print(f"\n{recipe.name}: {len(rows)} measurements in {minutes:.1f} min (MLflow run {summary.parent_run_id})\n")
    print(f"| variant | runtime | target | size MB | ppl | Δppl % | decode tok/s b1 | b4 | × transformers fp32 | of bound | native / portable |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (targets.index(r.target), r.runtime != "transformers", r.size_mb or 0)):
        fp32 = by.get(("baseline", r.target, "transformers"))
        other = by.get((r.variant, portable, r.runtime)) if r.target == native and portable else None
        print(
            f"| {r.variant} | {r.runtime} | {r.target} | {r.size_mb:.1f} | {r.ppl:.3f} | {r.ppl_delta_pct:+.1f} | "
            f"{r.decode_tok_s:.1f} | {r.profile.get('decode_tok_s.b4', float('nan')):.1f} | "
            f"{r.decode_tok_s / fp32.decode_tok_s:.2f} | {r.profile.get('decode_efficiency', float('nan')):.2f} | "
            f"{(r.decode_tok_s / other.decode_tok_s) if other else float('nan'):.2f} |"
        )

    checks = []
    for target in targets:
        fp32 = by.get(("baseline", target, "transformers"))
        within = [r for r in rows if r.target == target and r.runtime != "transformers" and r.ppl_delta_pct <= 5]
        if fp32 and within:
            best = max(within, key=lambda r: r.decode_tok_s)
            ratio = best.decode_tok_s / fp32.decode_tok_s
            checks.append((f"{target}: best within +5 % ppl ({best.variant}, {best.ppl_delta_pct:+.1f} %) decodes {ratio:.2f}x transformers fp32 (>= 5)", ratio >= 5))
        f32 = by.get(("f32", target, "llama_cpp"))
        if fp32 and f32:
            diff = abs(f32.ppl - fp32.ppl) / fp32.ppl * 100
            checks.append((f"{target}: llama.cpp f32 ppl {f32.ppl:.4f} vs transformers fp32 {fp32.ppl:.4f} ({diff:.3f} %, <= 0.1 %)", diff <= 0.1))
        for quant in ("q4_k_m", "iq4_nl", "q3_k_m"):
            plain, weighted = by.get((quant, target, "llama_cpp")), by.get((f"{quant}-imatrix", target, "llama_cpp"))
            if plain and weighted:
                checks.append((f"{target}: {quant} imatrix ppl {weighted.ppl:.3f} vs without {plain.ppl:.3f} (no worse)", weighted.ppl <= plain.ppl))
        onnx_f32 = by.get(("onnx-fp32", target, "onnxruntime_genai"))
        if fp32 and onnx_f32:
            diff = abs(onnx_f32.ppl - fp32.ppl) / fp32.ppl * 100
            checks.append((f"{target}: ONNX Runtime GenAI fp32 ppl {onnx_f32.ppl:.4f} vs transformers fp32 {fp32.ppl:.4f} ({diff:.3f} %, <= 0.1 %)", diff <= 0.1))
        onnx_int8 = by.get(("onnx-int8", target, "onnxruntime_genai"))
        if fp32 and onnx_int8:
            checks.append((f"{target}: ONNX int8 ppl {onnx_int8.ppl_delta_pct:+.2f} % over transformers fp32 (<= 2 %)", onnx_int8.ppl_delta_pct <= 2))
    if portable:
        ratios = [
            r.decode_tok_s / by[(r.variant, portable, r.runtime)].decode_tok_s
            for r in rows if r.target == native and r.runtime == "llama_cpp" and (r.variant, portable, r.runtime) in by
        ]
        if ratios:
            median = statistics.median(ratios)
            checks.append((f"native / portable llama.cpp decode, median over {len(ratios)} GGUF variants: {median:.3f}x "
                           f"[{min(ratios):.3f}-{max(ratios):.3f}] (> 1)", median > 1))
    print()
    winners(rows, targets)
    for text, ok in checks:
        print(("PASS " if ok else "MISS ") + text)
    for d in (d for d in summary.decisions if d["champion"]):
        print(f"champion-{d['target']}: {d['variant']} in {d['runtime']} (v{d['version']}): {d['reason']}")
    return 0


def winners(rows, targets) -> None:
    """Which runtime wins each objective on each target: overall and within +5 % perplexity."""
    objectives = {
        "lowest perplexity": (lambda r: r.ppl, False),
        "smallest file": (lambda r: r.size_mb, False),
        "fastest decode, batch 1": (lambda r: r.decode_tok_s, True),
        "fastest decode, batch 4": (lambda r: r.profile.get("decode_tok_s.b4", 0.0), True),
        "fastest time to first token (32-token prompt)": (lambda r: r.prefill_ms, False),
        "lowest peak memory": (lambda r: r.profile.get("peak_mem_mb", float("inf")), False),
    }
    for target in targets:
        mine = [r for r in rows if r.target == target]
        for label, pool in (("", mine), (" within +5 % ppl", [r for r in mine if r.ppl_delta_pct <= 5])):
            for objective, (key, high) in objectives.items():
                if not pool or (objective == "lowest perplexity" and label):
                    continue
                pick = max if high else min
                per_runtime = {rt: pick([r for r in pool if r.runtime == rt], key=key) for rt in {r.runtime for r in pool}}
                others = ", ".join(f"{rt} {key(r):.4g} ({r.variant})" for rt, r in sorted(per_runtime.items()))
                best = pick(pool, key=key)
                print(f"WINNER {target}{label}: {objective}: {best.runtime} ({best.variant}); best per runtime: {others}")
    print()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    default = "quick-runtimes.yaml" if "--quick" in sys.argv[1:] else "smollm2-runtimes.yaml"
    sys.exit(main(args[0] if args else str(ROOT / "bench" / "recipes" / default)))
