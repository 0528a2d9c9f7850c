"""Does `byoai auto` choose well? Its champions against an exhaustive search, for three budgets.

    python bench/auto.py          (the embedded SmolLM2-135M x WikiText-2 from ../shared; ~30 min on 2 cores)
    python bench/auto.py --quick  (a tiny random Llama, Python's docs, one budget: what the test suite runs)

1. One exhaustive recipe of every candidate the three budgets' auto recipes list, run from an empty
   BYOAI_HOME; each budget is then a selection (tasks.promote.decide) of that one measured set.
2. `byoai auto`'s recipe once per budget, each from an empty BYOAI_HOME, through the same flow.

Printed per budget: both champions, the objective's measure of each (the auto champion's as the
exhaustive run measured it, so run-to-run noise in decode speed does not decide), their ratio, and
auto's wall time over the exhaustive run's. Goals: the same champion or one within 2 % on the
objective's measure that passes the same gate; auto's wall time <= 40 % of the exhaustive run's.

Each step's numbers land in bench/results/auto/<mode>.json; a step already there is reused and
the bench says so (it resumes after an interruption; delete the file to measure again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "auto"
WORK = Path(os.environ.get("BYOAI_HOME", ROOT / ".byoai")).resolve() / "auto-bench"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"

BUDGETS = {
    "fastest-within-5pct": {"objective": "fastest", "max_ppl_increase": 5.0},
    "smallest-within-10pct": {"objective": "smallest", "max_ppl_increase": 10.0},
    "best_quality-under-100mb": {"objective": "best_quality", "max_size_mb": 100.0},
}
MEASURE = {"smallest": "size_mb", "fastest": "decode_tok_s", "best_quality": "ppl"}
# --quick: one budget and three GGUF types, so the suite runs the mechanism, not the measurement
QUICK_BUDGET = "smallest-within-10pct"
QUICK_CANDIDATES = ("gguf-q8_0", "gguf-q4_0", "gguf-q2_k")


def quick_model() -> Path:
    """A 2-layer random Llama (hidden 256) with SmolLM2's tokenizer, which llama.cpp converts."""
    folder = WORK / "quick-model"
    if (folder / "config.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT))
    from byoai.recipe import EmbeddedModel
    from byoai.settings import Settings
    from byoai.tasks.model import resolve_model
    from tests.tiny import make_tiny_model

    os.environ["BYOAI_HOME"] = str(WORK / "models-home")
    smollm2 = resolve_model.fn(EmbeddedModel(), str(Settings().models_dir()))
    return make_tiny_model(folder, hidden=256, intermediate=512, tokenizer_dir=Path(smollm2.path))


def recipes(quick: bool) -> tuple[dict, dict[str, dict]]:
    """(the exhaustive recipe, budget -> its auto recipe), as the data `byoai auto` writes."""
    from byoai.auto import auto_recipe

    model = str(quick_model()) if quick else "embedded"
    texts = ("builtin:python-docs", "builtin:python-docs") if quick or not WIKITEXT.is_dir() else (str(WIKITEXT / "valid.txt"), str(WIKITEXT / "test.txt"))
    autos = {}
    for budget, options in BUDGETS.items():
        if quick and budget != QUICK_BUDGET:
            continue
        size = options.get("max_size_mb")
        data, _ = auto_recipe(
            model, ["cpu-x86"], f"auto-{budget}", options["objective"], size, None, options.get("max_ppl_increase"),
            texts[0], texts[1], None, ROOT,
        )
        if quick:
            data["variants"] = [v for v in data["variants"] if v["name"] in QUICK_CANDIDATES]
            data["evaluation"]["perplexity"]["max_tokens"] = 2048
        autos[budget] = data
    union = {}
    for data in autos.values():
        for variant in data["variants"]:
            union.setdefault(variant["name"], variant)
    first = next(iter(autos.values()))
    exhaustive = {key: first[key] for key in ("model", "calibration", "evaluation", "targets")} | {
        "name": "auto-exhaustive", "variants": list(union.values()),
        "promotion": {"gate": {"max_ppl_increase_pct": 1000}, "objective": "smallest"},  # selections come after
    }
    return exhaustive, autos


def run_recipe(data: dict, home: Path) -> dict:
    """Run one recipe from an empty home; its wall time and every finished row."""
    import yaml

    from byoai.flows.optimize import run_optimize
    from byoai.recipe import load_recipe

    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    os.environ["BYOAI_HOME"] = str(home)
    os.environ["BYOAI_REGISTER_COPIES"] = "false"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    path = home / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    started = time.perf_counter()
    summary = run_optimize(load_recipe(path))
    wall_s = time.perf_counter() - started
    rows = [r.model_dump(include={"variant", "version", "runtime", "status", "ppl", "ppl_delta_pct", "size_mb", "decode_tok_s", "reason"})
            for r in summary.results]
    champion = summary.champions.get("cpu-x86")
    by_version = {r["version"]: r["variant"] for r in rows if r["version"]}
    return {"wall_s": round(wall_s, 1), "mlflow_run": summary.parent_run_id, "rows": rows, "champion": by_version.get(champion)}


def select(rows: list[dict], promotion: dict) -> str | None:
    """The exhaustive run's champion under one budget: the same decision byoai's promotion makes."""
    from byoai.recipe import PromotionSpec
    from byoai.tasks.promote import Candidate, decide

    candidates = [Candidate(variant=r["variant"], version=r["version"], runtime=r["runtime"], ppl=r["ppl"], ppl_delta_pct=r["ppl_delta_pct"],
                            size_mb=r["size_mb"], decode_tok_s=r["decode_tok_s"])
                  for r in rows if r["status"] == "finished" and r["version"]]
    winner, _ = decide(candidates, None, PromotionSpec.model_validate(promotion))
    return next((c.variant for c in candidates if c.version == winner), None)


def compare(budget: str, auto: dict, exhaustive: dict, promotion: dict) -> dict:
    from byoai.recipe import PromotionSpec
    from byoai.tasks.promote import Candidate, rejection

    objective = promotion["objective"]
    measure = MEASURE[objective]
    best = select(exhaustive["rows"], promotion)
    measured = {r["variant"]: r for r in exhaustive["rows"] if r["status"] == "finished"}
    mine = measured.get(auto["champion"])
    row = {"budget": budget, "exhaustive": best, "auto": auto["champion"], "measure": measure,
           "time_ratio": auto["wall_s"] / exhaustive["wall_s"], "auto_wall_s": auto["wall_s"]}
    if best is None or mine is None:
        return row | {"ok": best is None and auto["champion"] is None, "ratio": None}
    ratio = mine[measure] / measured[best][measure]
    worse = ratio - 1 if objective in ("smallest", "best_quality") else 1 - ratio
    candidate = Candidate(variant=mine["variant"], version="x", ppl=mine["ppl"], ppl_delta_pct=mine["ppl_delta_pct"], size_mb=mine["size_mb"], decode_tok_s=mine["decode_tok_s"])
    passes = rejection(candidate, PromotionSpec.model_validate(promotion)) is None
    return row | {"ratio": ratio, "ok": (auto["champion"] == best or worse <= 0.02) and passes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, three candidates (what CI runs)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "smollm2-wikitext2"
    results_file = (WORK if args.quick else RESULTS) / f"{mode}.json"
    done = {} if args.quick or not results_file.is_file() else json.loads(results_file.read_text())
    exhaustive_data, autos = recipes(args.quick)
    steps = {"exhaustive": exhaustive_data, **{f"auto {b}": d for b, d in autos.items()}}
    for step, data in steps.items():
        if step in done:
            print(f"resumed: {step} from {results_file} (MLflow run {done[step]['mlflow_run']})")
            continue
        done[step] = run_recipe(data, WORK / step.replace(" ", "-"))
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(done, indent=2))
        shutil.rmtree(WORK / step.replace(" ", "-"), ignore_errors=True)
    rows = [compare(b, done[f"auto {b}"], done["exhaustive"], d["promotion"]) for b, d in autos.items()]
    print(f"exhaustive: {len(exhaustive_data['variants'])} candidates, {done['exhaustive']['wall_s'] / 60:.1f} min (MLflow run {done['exhaustive']['mlflow_run']})")
    print("| budget | exhaustive champion | auto champion | measure | auto / exhaustive | auto wall min | auto / exhaustive wall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"| {r['budget']} | {r['exhaustive']} | {r['auto']} | {r['measure']} | {ratio} | {r['auto_wall_s'] / 60:.1f} | {r['time_ratio']:.2f} |")
    checks = [(f"{r['budget']}: auto champion {r['auto']} is the exhaustive one ({r['exhaustive']}) or within 2 % on {r['measure']}, passing the gate", r["ok"]) for r in rows]
    checks += [(f"{r['budget']}: auto wall time {r['time_ratio']:.2f} x the exhaustive run's (<= 0.40)", r["time_ratio"] <= 0.40) for r in rows]
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
