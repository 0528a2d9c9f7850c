"""Serving benchmark: every GGUF candidate served by llama-server to concurrent streaming users.

    python bench/serving.py [RECIPE]    (default: bench/recipes/smollm2-serving.yaml, ~15 min)
    python bench/serving.py --quick     (bench/recipes/quick-serving.yaml: what CI runs)

Runs the recipe (a real `byoai run`: Prefect, MLflow, registry; the candidates served by the
runtime's own llama-server, driven by the closed-loop streaming client of tasks.serving) and
prints, from that one run:
  - candidates x users: TTFT p50/p95, inter-token latency p95, output tokens/s in total and per
    user, requests/s, and the CPU seconds of the server and of the load generator beside it;
  - each candidate's throughput at the most users over its 1-user throughput (the number to
    reach: q8_0 at 8 users >= 2x its 1-user throughput);
  - the SLO the recipe states, and which candidate `capacity` promotes under it;
  - speculative decoding, the recipe's `speculative` pairs (every served candidate as main model
    with every candidate at least 2x smaller as draft, and with llama.cpp's n-gram lookup):
    acceptance, the server's 1-user decode speed-up, whether the greedy output is identical token
    by token, and whether the pair was registered. The number to reach: a pair at >= 1.2x the
    main model's 1-user decode with identical output.
Its numbers land in bench/results/serving/<recipe name>.json (not in quick mode).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def level(row, users: int, metric: str) -> float:
    return row.serving.get(f"serving.u{users}.{metric}", float("nan"))


def main(recipe_path: str, record: bool = True) -> int:
    from byoai.flows.optimize import run_optimize
    from byoai.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    serving, slo = recipe.evaluation.serving, recipe.promotion.slo
    started = time.perf_counter()
    summary = run_optimize(recipe)
    minutes = (time.perf_counter() - started) / 60
    served = [r for r in summary.results if r.status == "finished" and r.serving]
    print(f"\n{recipe.name}: {len(served)} candidates served at {list(serving.users)} users in a {minutes:.1f} min run "
          f"(MLflow run {summary.parent_run_id}); {serving.requests_per_user} requests per user, {serving.prompt_tokens}-token "
          f"prompts, {serving.new_tokens} new tokens, streamed\n")
    print("| candidate | size MB | Δppl % | users | TTFT p50 ms | TTFT p95 ms | ITL p95 ms | tok/s | tok/s per user | req/s | server CPU s | client CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in served:
        for users in serving.users:
            print(f"| {r.variant} | {r.size_mb:.1f} | {r.ppl_delta_pct:+.2f} | {users} | {level(r, users, 'ttft_ms_p50'):.0f} | "
                  f"{level(r, users, 'ttft_ms_p95'):.0f} | {level(r, users, 'itl_ms_p95'):.1f} | {level(r, users, 'tok_s'):.1f} | "
                  f"{level(r, users, 'tok_s_per_user'):.1f} | {level(r, users, 'requests_per_s'):.2f} | "
                  f"{level(r, users, 'server_cpu_s'):.1f} | {level(r, users, 'client_cpu_s'):.1f} |")
    top = max(serving.users)
    print()
    scaling = {}
    for r in served:
        scaling[r.variant] = level(r, top, "tok_s") / level(r, 1, "tok_s") if 1 in serving.users else float("nan")
        print(f"{r.variant}: throughput at {top} users / at 1 user = {scaling[r.variant]:.2f}x")
    checks = []
    if "q8_0" in scaling and top >= 8:
        checks.append((f"q8_0 throughput at {top} users is {scaling['q8_0']:.2f}x its 1-user throughput (>= 2)", scaling["q8_0"] >= 2))
    print(f"\nSLO (promotion.slo): {slo.users} users, p95 TTFT <= {slo.p95_ttft_ms:g} ms, p95 ITL <= {slo.p95_itl_ms:g} ms; objective {recipe.promotion.objective}")
    for d in summary.decisions:
        print(f"  {d['variant']} [{d['runtime']}]: {d.get('slo', '')}; {'CHAMPION ' if d['champion'] else ''}{d['reason']}")
    for d in (d for d in summary.decisions if d["champion"]):
        print(f"champion-{d['target']}: {d['variant']} in {d['runtime']} (v{d['version']}): {d['reason']}")
    pairs = [r for r in summary.results if "speculative.speedup" in r.profile]
    if pairs:
        print(f"\nspeculative decoding, 1 user, greedy, {serving.prompt_tokens}-token prompts, {serving.new_tokens} new tokens "
              "(the server's own decode speed; output compared token by token with the main model alone):\n")
        print("| main | draft | draft / main size | n_max | acceptance | main tok/s | with draft tok/s | speed-up | TTFT ms main / with | identical output | registered |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in pairs:
            p = {k.removeprefix("speculative."): v for k, v in r.profile.items() if k.startswith("speculative.")}
            main, _, draft = r.variant.partition("-spec-")
            print(f"| {main} | {draft} | {p['draft_size_ratio']:.2f} | {p['n_max']:.0f} | {p['acceptance']:.2f} ({p['accepted']:.0f}/{p['drafted']:.0f}) | "
                  f"{p['main_tok_s']:.1f} | {p['pair_tok_s']:.1f} | {p['speedup']:.2f}x | {p['main_ttft_ms']:.0f} / {p['pair_ttft_ms']:.0f} | "
                  f"{'yes' if p['identical'] else 'NO'} | {'v' + r.version if r.version else r.reason.removeprefix('not registered: ').split(' (')[0]} |")
        best = max((r for r in pairs if r.profile["speculative.identical"]), key=lambda r: r.profile["speculative.speedup"], default=None)
        speedup = best.profile["speculative.speedup"] if best else 0.0
        checks.append((f"best lossless pair: {best.variant if best else 'none'} at {speedup:.2f}x its main model's 1-user decode (>= 1.2)", speedup >= 1.2))
    for text, ok in checks:
        print(("PASS " if ok else "MISS ") + text)
    if not record:
        return 0
    out = ROOT / "bench" / "results" / "serving" / f"{recipe.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "recipe": recipe.name, "mlflow_run": summary.parent_run_id, "run_min": round(minutes, 1),
        "serving": serving.model_dump(), "slo": slo.model_dump() if slo else None,
        "candidates": [{"variant": r.variant, "size_mb": r.size_mb, "ppl_delta_pct": r.ppl_delta_pct, "serving": r.serving} for r in served],
        "decisions": summary.decisions,
        "pairs": [{"pair": r.variant, "version": r.version, "reason": r.reason, **r.profile} for r in pairs],
    }, indent=1))
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    default = "quick-serving.yaml" if "--quick" in sys.argv[1:] else "smollm2-serving.yaml"
    sys.exit(main(args[0] if args else str(ROOT / "bench" / "recipes" / default), record="--quick" not in sys.argv[1:]))
