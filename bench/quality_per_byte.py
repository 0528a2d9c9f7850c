"""Quality per byte in the shipped format: every GGUF variant measured in llama.cpp, in one flow run.

    python bench/quality_per_byte.py [RECIPE]  (default: bench/recipes/smollm2-quality-per-byte.yaml)
    python bench/quality_per_byte.py --quick   (bench/recipes/quick-quality-per-byte.yaml: what CI runs)

Runs the recipe (a real `byoai run`) and prints each variant's GGUF size, perplexity increase over
transformers fp32, the predicted loss where the technique made one (gguf_mixed: summed KL) and
decode speed; then checks the issue's numbers against the uniform types measured in the same run:
at or below q4_k_m's file size, a mixed file within +3 % ppl; at or below q4_0's, within +10 %;
qat -> gguf q4_0 at most half of imatrix q4_0's increase.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gguf_mb(mlflow, row) -> float | None:
    """The GGUF file's size from the variant's facts (the last stage's, for a chain)."""
    params = mlflow.get_run(row.run_id).data.params
    sizes = [float(v) for k, v in params.items() if k.endswith("fact.gguf_mb")]
    return max(sizes) if sizes else None


def main(recipe_path: str) -> int:
    from byoai.flows.optimize import run_optimize
    from byoai.recipe import load_recipe
    from byoai.tasks.tracking import client

    recipe = load_recipe(recipe_path)
    started = time.perf_counter()
    summary = run_optimize(recipe)
    minutes = (time.perf_counter() - started) / 60
    mlflow = client(summary.tracking_uri)
    rows = [r for r in summary.results if r.status == "finished" and r.runtime == "llama_cpp" and r.variant != "input"]
    size = {r.variant: gguf_mb(mlflow, r) for r in rows}
    by = {r.variant: r for r in rows}

    print(f"\n{recipe.name}: {len(rows)} GGUF variants measured in llama.cpp in {minutes:.1f} min (MLflow run {summary.parent_run_id})\n")
    print("| variant | technique | GGUF MB | ppl | Δppl % | predicted KL | decode tok/s b1 |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (size[r.variant] or 0, r.ppl)):
        predicted = f"{r.predicted_loss:.4f}" if r.predicted_loss is not None else ""
        print(f"| {r.variant} | {r.technique} | {size[r.variant]:.1f} | {r.ppl:.3f} | {r.ppl_delta_pct:+.2f} | {predicted} | {r.decode_tok_s:.1f} |")
    for r in summary.results:
        if r.status != "finished":
            print(f"| {r.variant} | {r.technique} | {r.status}: {r.reason[:200]} |")

    checks = []
    # SmolLM2's offline copy was a Q4_1 file, so a q4_1 grid is unusually kind to it: the mixed
    # files are checked with and without q4_1 among their candidate types
    candidates = {v.name: v.stages[-1].params.get("candidates") for v in recipe.variants if v.stages[-1].technique == "gguf_mixed"}
    mixed = [r for r in rows if r.variant in candidates]
    for uniform, goal in (("q4_k_m", 3.0), ("q4_0", 10.0)):
        if uniform not in by:
            continue
        for label, pool in (("", mixed), (" without q4_1", [r for r in mixed if "q4_1" not in candidates[r.variant]])):
            fitting = [r for r in pool if size[r.variant] <= size[uniform]]
            if fitting:
                best = min(fitting, key=lambda r: r.ppl)
                checks.append((
                    f"at or below {uniform}'s size ({size[uniform]:.1f} MB, {by[uniform].ppl_delta_pct:+.1f} %){label}: {best.variant} "
                    f"{size[best.variant]:.1f} MB, {best.ppl_delta_pct:+.2f} % (<= +{goal:g} %)", best.ppl_delta_pct <= goal,
                ))
    qat, weighted = by.get("qat-q4_0"), by.get("q4_0-imatrix")
    if qat and weighted:
        checks.append((f"qat -> q4_0 {qat.ppl_delta_pct:+.2f} % vs imatrix q4_0 {weighted.ppl_delta_pct:+.2f} % (at most half)",
                       qat.ppl_delta_pct <= weighted.ppl_delta_pct / 2))
    print()
    for text, ok in checks:
        print(("PASS " if ok else "MISS ") + text)
    for d in (d for d in summary.decisions if d["champion"]):
        print(f"champion-{d['target']}: {d['variant']} in {d['runtime']} (v{d['version']}): {d['reason']}")
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    default = "quick-quality-per-byte.yaml" if "--quick" in sys.argv[1:] else "smollm2-quality-per-byte.yaml"
    sys.exit(main(args[0] if args else str(ROOT / "bench" / "recipes" / default)))
