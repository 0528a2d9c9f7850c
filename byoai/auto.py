"""`byoai auto`: a recipe written for the user from a model, targets and a budget.

The candidates come from what each target's runtimes ship (llama.cpp: GGUF types, with and without
imatrix, a mixed GGUF at the size budget, AutoRound and QAT onto q4_0; ONNX Runtime GenAI: int4 and
int8; transformers formats only on CUDA targets, where they are what ships). A candidate whose
estimated size breaks the budget, or that the memory plan says cannot fit, is left out with why.
The rest are ordered (`choose`: the one-pass kinds by the objective, then the costlier kinds, the
expensive ones last so the time budget stops before them) and searched by the recipe's `auto`
section: the same flow, registry and champions as `byoai run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byoai.recipe import PromotionSpec, Recipe, RecipeError, TargetProfile

# A rough build time: fixed seconds plus seconds per billion parameters, by candidate kind, from
# this project's 2-core CPU measurements (docs/scale.md, the 135M and 1B rows). On a GPU worker
# the calibrated kinds are far faster; the estimate is for ordering and for --dry-run's total.
BUILD_COST_S = {
    "gguf": (10, 35), "gguf+imatrix": (15, 120), "gguf_mixed": (25, 130), "onnx": (15, 55),
    "gptq": (30, 400), "awq": (30, 300), "bnb": (10, 20), "autoround": (120, 2500), "qat": (600, 12000),
}
EVALUATE_S = (4, 20)  # one full evaluation, fixed + per billion parameters
EXPENSIVE = {"autoround", "qat"}  # only with a time budget they fit in
# Kinds that read the weights once, with at most one calibration pass: within ~2 x of each
# other's cost, so they are ordered by the objective, not by cost (a 135M smallest search built 6
# of them in cost order, 4 in size order: session 14, docs/auto.md). gguf_mixed is one of them:
# its importance matrix and per-tensor sensitivity table (rounded in ggml) cost what the first
# importance-matrix type costs (SmolLM2: 28.2 s against 28.5 s, session 15), and at a size budget
# it is the file best_quality most likely promotes, so it goes first there.
ONE_PASS = {"gguf", "gguf+imatrix", "gguf_mixed", "onnx", "bnb"}

GGUF_TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")
IMATRIX_TYPES = ("q4_k_m", "q3_k_m", "q2_k")  # where llama.cpp's importance matrix pays most


@dataclass
class Choice:
    """One candidate as --dry-run lists it: in or out, and why."""

    variant: dict[str, Any]
    kind: str
    included: bool
    why: str
    size_mb: float  # the memory plan's estimate of its file
    estimate_s: float  # rough build + rung + full evaluation time (BUILD_COST_S)


def model_source(model: str) -> dict[str, Any]:
    """MODEL as a recipe's model: `embedded`, a `.gguf` file, a model folder or a hub id."""
    path = Path(model).expanduser()
    if model == "embedded":
        return {"kind": "embedded"}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RecipeError(f"MODEL: {model} does not exist; give an existing .gguf file")
        return {"kind": "gguf", "path": str(path.resolve())}
    if path.is_dir():
        return {"kind": "local", "path": str(path.resolve())}
    if model.count("/") == 1 and not path.exists() and all(part and not part.startswith(".") for part in model.split("/")):
        return {"kind": "hub", "id": model}
    raise RecipeError(f"MODEL: {model!r} is not `embedded`, an existing model folder, a .gguf file or a hub id (owner/name)")


def text_source(option: str, value: str, split: str) -> dict[str, Any]:
    """--calibration / --evaluation: `builtin:python-docs` or a text file."""
    if value == "builtin:python-docs":
        return {"kind": "builtin", "name": "python-docs", "split": split}
    path = Path(value).expanduser()
    if not path.is_file():
        raise RecipeError(f"{option}: {value} is neither builtin:python-docs nor an existing text file")
    return {"kind": "file", "path": str(path.resolve())}


def candidate_variants(targets: list[TargetProfile], promotion: PromotionSpec) -> list[tuple[dict[str, Any], str]]:
    """(variant, kind) for every technique the targets' runtimes can ship, cheapest kinds first."""
    runtimes = {r for t in targets for r in t.runtimes}
    out: list[tuple[dict[str, Any], str]] = []
    if "llama_cpp" in runtimes:
        out += [({"name": f"gguf-{q}", "technique": "gguf", "params": {"quant_type": q}}, "gguf") for q in GGUF_TYPES]
        out += [({"name": f"gguf-{q}-imatrix", "technique": "gguf", "params": {"quant_type": q, "imatrix": True}}, "gguf+imatrix") for q in IMATRIX_TYPES]
        if promotion.max_size_mb is not None:
            out.append(({"name": "gguf-mixed-at-budget", "technique": "gguf_mixed", "params": {"max_size_mb": promotion.max_size_mb, "imatrix": True}}, "gguf_mixed"))
        out.append(({"name": "autoround-q4_0", "technique": "autoround", "params": {"export": "q4_0"}}, "autoround"))
        # QAT trains on q4_0's grid; the GGUF export after it writes that grid
        out.append(({"name": "qat-q4_0", "stages": [{"technique": "qat", "params": {"quant_type": "q4_0"}},
                                                   {"technique": "gguf", "params": {"quant_type": "q4_0"}}]}, "qat"))
    if "onnxruntime_genai" in runtimes:
        out += [({"name": f"onnx-{p}", "technique": "onnx", "params": {"precision": p}}, "onnx") for p in ("int4", "int8")]
    if "transformers" in runtimes and any(t.device == "cuda" for t in targets):
        out += [
            ({"name": "gptq-w4-g128", "technique": "gptq", "params": {"bits": 4, "group_size": 128}}, "gptq"),
            ({"name": "awq-w4-g128", "technique": "awq", "params": {"bits": 4, "group_size": 128}}, "awq"),
            ({"name": "bnb-nf4", "technique": "bnb", "params": {}}, "bnb"),
        ]
    return out


def estimate_s(kind: str, params: int, rungs: int) -> float:
    fixed, per_b = BUILD_COST_S[kind]
    eval_fixed, eval_per_b = EVALUATE_S
    billions = params / 1e9
    # the rungs measure a few windows each: about a fifth of a full evaluation between them
    return fixed + per_b * billions + (1 + 0.2 * rungs) * (eval_fixed + eval_per_b * billions)


def choose(recipe: Recipe, kinds: dict[str, str]) -> list[Choice]:
    """In or out for each of the recipe's candidates: the size budget on the plan's estimated
    size, the memory plan, and the time budget for the expensive kinds; the kept ones in search order."""
    from byoai.memory import GGUF_BITS, gguf_size
    from byoai.plan import capacity_of, model_shape, plan_memory
    from byoai.tasks.search import gguf_types

    shape = model_shape(recipe)
    plan = plan_memory(recipe, shape, list(recipe.targets), capacity_of)
    promotion, auto = recipe.promotion, recipe.auto
    choices = []
    for variant in recipe.variants:
        kind = kinds[variant.name]
        spent = estimate_s(kind, shape.params, len(auto.rungs))
        plans = [p for t in recipe.targets if (p := plan.of(variant.name, t.name)) is not None and p.rows]
        size_mb = min((p.artifact / 1e6 for p in plans), default=0.0)
        skips = [p.skip_reason() for p in plans]
        variant_dict = variant.model_dump(mode="json", exclude_defaults=True)
        if kind == "gguf_mixed":  # built to the budget, down to every tensor in its smallest type
            size_mb = max(size_mb, gguf_size(shape, min(variant.stages[-1].params["candidates"], key=GGUF_BITS.get)) / 1e6)
        if promotion.max_size_mb is not None and size_mb > promotion.max_size_mb:
            why, included = f"~{size_mb:.0f} MB estimated, over --max-size-mb {promotion.max_size_mb:g}", False
        elif plans and all(skips):
            why, included = f"the memory plan: {skips[0]}", False
        elif kind in EXPENSIVE and (auto.time_budget_min is None or spent > auto.time_budget_min * 60):
            budget = "no --time-budget-min" if auto.time_budget_min is None else f"~{spent / 60:.0f} min, over --time-budget-min {auto.time_budget_min:g}"
            why, included = f"expensive ({budget}); give a time budget that holds it", False
        else:
            why, included = f"~{size_mb:.0f} MB estimated", True
        choices.append(Choice(variant_dict, kind, included, why, size_mb, spent))
    # The one-pass kinds first, in the order in which a passing candidate leaves the least room
    # to the rest (tasks.search.RungSearch.room_to_improve): smallest first for smallest and
    # fastest, largest first for best_quality; then the other kinds, cheapest first. A GGUF type
    # without an importance matrix whose twin with one is kept goes right after that twin, which,
    # once measured, makes it redundant.
    direction = -1 if promotion.objective == "best_quality" else 1
    layouts = {v.name: gguf_types(v) for v in recipe.variants}
    # the GGUF layouts kept with an importance matrix
    with_imatrix = {layout[0] for c in choices if c.included and (layout := layouts[c.variant["name"]]) and layout[1]}
    twins = {}  # a plain GGUF candidate -> its layout, kept with an importance matrix too
    for choice in choices:
        layout = layouts[choice.variant["name"]]
        if choice.included and layout is not None and not layout[1] and layout[0] in with_imatrix:
            twins[choice.variant["name"]] = layout[0]
            choice.why += "; after its twin with an importance matrix (skipped once that is measured)"

    def order(choice: Choice) -> tuple:
        twin = twins.get(choice.variant["name"])
        tier = (0, 0) if choice.kind in ONE_PASS else BUILD_COST_S[choice.kind]
        return tier, direction * choice.size_mb, twin is not None

    kept = sorted((c for c in choices if c.included), key=order)
    return kept + [c for c in choices if not c.included]


def auto_recipe(
    model: str, targets: list[str], name: str | None, objective: str, max_size_mb: float | None, min_decode_tok_s: float | None,
    max_ppl_increase: float | None, calibration: str, evaluation: str, time_budget_min: float | None, base_dir: Path,
) -> tuple[dict[str, Any], list[Choice]]:
    """The recipe `byoai auto` writes (as plain data, validated) and the choices behind its candidates.

    Raises RecipeError naming the option for bad input, or when no candidate can meet the budget
    (with the smallest estimate)."""
    from byoai.recipe import available_targets, load_target

    known = available_targets(base_dir)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise RecipeError(f"--target: unknown {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    if not targets:
        raise RecipeError("--target: give at least one target, e.g. --target cpu-x86")
    profiles = [load_target(known[t]) for t in targets]
    source = model_source(model)
    gate = {"max_ppl_increase_pct": max_ppl_increase} if max_ppl_increase is not None else {}
    promotion = {"gate": gate, "objective": objective, "max_size_mb": max_size_mb, "min_decode_tok_s": min_decode_tok_s}
    promotion = {k: v for k, v in promotion.items() if v is not None}
    candidates = candidate_variants(profiles, PromotionSpec.model_validate(promotion))
    kinds = {v["name"]: kind for v, kind in candidates}
    stem = name or _model_stem(model, source)
    data = {
        "name": stem,
        "description": f"written by byoai auto for {model} on {', '.join(targets)} ({objective})",
        "model": source,
        "calibration": {"source": text_source("--calibration", calibration, "train"), "n_samples": 32, "seq_len": 256},
        "evaluation": {"perplexity": {"source": text_source("--evaluation", evaluation, "test"), "max_tokens": 4096, "seq_len": 512}},
        "targets": targets,
        "promotion": promotion,
        "variants": [v for v, _ in candidates],
        "auto": {"time_budget_min": time_budget_min} if time_budget_min else {},
    }
    recipe = _validated(data, base_dir)
    choices = choose(recipe, kinds)
    as_written = {v["name"]: v for v, _ in candidates}  # the short form, not every default spelled out
    kept = [as_written[c.variant["name"]] for c in choices if c.included]
    if not kept:
        smallest = min(choices, key=lambda c: c.size_mb)
        if max_size_mb is not None and source["kind"] in ("gguf", "embedded") and input_size_mb(recipe) <= max_size_mb:
            raise InputStillBest(f"the input file is still best: only it meets --max-size-mb {max_size_mb:g} "
                                 f"({input_size_mb(recipe):.1f} MB; the smallest candidate, {smallest.variant['name']}, is ~{smallest.size_mb:.0f} MB). "
                                 "Nothing to build or promote.")
        if max_size_mb is not None and smallest.size_mb > max_size_mb:
            raise RecipeError(f"--max-size-mb {max_size_mb:g}: no candidate can meet it; the smallest is "
                              f"{smallest.variant['name']} at ~{smallest.size_mb:.0f} MB. Raise the budget.")
        reasons = "; ".join(f"{c.variant['name']}: {c.why}" for c in choices[:3])
        raise RecipeError(f"--target {', '.join(targets)}: no candidate can run there ({reasons}; ...)")
    data["variants"] = kept
    _validated(data, base_dir)
    return data, choices


class InputStillBest(RecipeError):
    """Only the recipe's own GGUF file meets the budget: nothing to build or promote."""


def input_size_mb(recipe: Recipe) -> float:
    from byoai.recipe import GgufModel
    from byoai.tasks.model import embedded_gguf

    path = recipe.model.path if isinstance(recipe.model, GgufModel) else embedded_gguf()
    return path.stat().st_size / 1e6


def _model_stem(model: str, source: dict[str, Any]) -> str:
    import re

    base = {"embedded": "smollm2-135m", "hub": model.split("/")[-1]}.get(source["kind"], Path(model).stem or Path(model).name)
    return re.sub(r"[^A-Za-z0-9._-]", "-", base).strip("-.")[:90] + "-auto"


def _validated(data: dict[str, Any], base_dir: Path) -> Recipe:
    from pydantic import ValidationError

    try:
        return Recipe.model_validate(data, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        raise RecipeError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))) from None

