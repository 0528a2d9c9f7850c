"""promote_champion: move `champion-<target>` only to a gated variant that beats the champion."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from byoai.log import step_logger
from byoai.recipe import PromotionSpec
from byoai.tasks.evaluate import Metrics, ppl_delta_pct
from byoai.tasks.card import promotion_text, with_promotion
from byoai.tasks.lm_eval_tasks import recovery
from byoai.tasks.tracking import TAG, client, evaluation_run_id


class Candidate(BaseModel):
    model_config = ConfigDict(frozen=True)

    variant: str
    version: str
    runtime: str = "transformers"
    # where the gate's reference was measured: "transformers" or "llama_cpp" (a GGUF of the base model)
    reference_runtime: str = "transformers"
    ppl: float
    ppl_delta_pct: float
    size_mb: float
    decode_tok_s: float
    # lm-eval task -> variant score / base model score (empty without evaluation.tasks)
    task_recovery: dict[str, float] = {}

    @classmethod
    def measured(cls, variant: str, version: str, metrics: Metrics, reference: Metrics) -> Candidate:
        return cls(
            variant=variant,
            version=version,
            runtime=metrics.runtime,
            reference_runtime=reference.runtime,
            ppl=metrics.ppl,
            ppl_delta_pct=ppl_delta_pct(metrics, reference),
            size_mb=metrics.size_mb,
            decode_tok_s=metrics.decode_tok_s,
            task_recovery=recovery(metrics.tasks, reference.tasks),
        )


# A version tag: the MLflow parent run that made this version its target's champion.
CHAMPION_SINCE = f"{TAG}champion_since"


def alias_for(target: str) -> str:
    return f"champion-{target}"


# Objective -> sort key; smaller is better. Perplexity breaks ties, then the name (stable order).
_OBJECTIVES = {
    "smallest": lambda c: (round(c.size_mb, 3), c.ppl, c.variant),
    "fastest": lambda c: (-round(c.decode_tok_s, 3), c.ppl, c.variant),
    "best_quality": lambda c: (c.ppl, round(c.size_mb, 3), c.variant),
}
_OBJECTIVE_METRIC = {"smallest": "size_mb", "fastest": "decode_tok_s", "best_quality": "ppl"}


def objective_key(objective: str):
    """Sort key of candidates under an objective: the best first."""
    return _OBJECTIVES[objective]


def pareto_front(candidates: list[Candidate]) -> set[str]:
    """Versions no other candidate beats on all of perplexity, size and decode speed at once."""

    def dominates(a: Candidate, b: Candidate) -> bool:
        at_least = a.ppl <= b.ppl and a.size_mb <= b.size_mb and a.decode_tok_s >= b.decode_tok_s
        better = a.ppl < b.ppl or a.size_mb < b.size_mb or a.decode_tok_s > b.decode_tok_s
        return at_least and better

    return {c.version for c in candidates if not any(dominates(o, c) for o in candidates if o is not c)}


def rejection(c: Candidate, promotion: PromotionSpec) -> str | None:
    """Why a candidate may not be champion (gate, then budgets), or None."""
    limit = promotion.gate.max_ppl_increase_pct
    if c.ppl_delta_pct > limit:
        return f"gate failed: ppl +{c.ppl_delta_pct:.2f}% > {limit:g}%"
    bar = promotion.gate.min_task_recovery
    if bar is not None:
        low = {task: r for task, r in c.task_recovery.items() if not r >= bar}
        if low:
            return "gate failed: task recovery " + ", ".join(f"{t} {r:.3f}" for t, r in sorted(low.items())) + f" < {bar:g}"
    if promotion.max_size_mb is not None and c.size_mb > promotion.max_size_mb:
        return f"over budget: {c.size_mb:.1f} MB > max_size_mb {promotion.max_size_mb:g}"
    if promotion.min_decode_tok_s is not None and c.decode_tok_s < promotion.min_decode_tok_s:
        return f"under budget: {c.decode_tok_s:.1f} tok/s < min_decode_tok_s {promotion.min_decode_tok_s:g}"
    return None


def decide(candidates: list[Candidate], champion: Candidate | None, promotion: PromotionSpec) -> tuple[str | None, list[dict[str, Any]]]:
    """Pure decision: (version to alias or None to keep, one explained row per candidate)."""
    key = _OBJECTIVES[promotion.objective]
    metric = _OBJECTIVE_METRIC[promotion.objective]
    front = pareto_front(candidates)
    passing = sorted((c for c in candidates if rejection(c, promotion) is None), key=key)
    best = passing[0] if passing else None
    if best is None:
        winner, verdict = None, "no candidate passes the gate and budgets; champion unchanged"
    elif champion is None:
        winner, verdict = best.version, f"first champion: best {metric} among gated candidates"
    elif best.version == champion.version:
        winner, verdict = None, "already champion"
    elif key(best)[0] < key(champion)[0]:
        winner, verdict = best.version, (
            f"beats champion v{champion.version} on {metric}: "
            f"{getattr(best, metric):.3f} vs {getattr(champion, metric):.3f}"
        )
    else:
        winner, verdict = None, (
            f"does not beat champion v{champion.version} on {metric} "
            f"({getattr(best, metric):.3f} vs {getattr(champion, metric):.3f}); champion kept"
        )
    rows = []
    for c in sorted(candidates, key=key):
        rejected = rejection(c, promotion)
        gate = rejected is None or not rejected.startswith("gate failed")
        if rejected:
            why = rejected
        elif c is best:
            why = verdict
        else:
            why = f"passes the gate; {metric} {getattr(c, metric):.3f} worse than {best.variant}"
        rows.append({
            "variant": c.variant,
            "runtime": c.runtime,
            "version": c.version,
            "ppl": round(c.ppl, 4),
            "ppl_delta_pct": round(c.ppl_delta_pct, 3),
            "reference": c.reference_runtime,
            "size_mb": round(c.size_mb, 3),
            "decode_tok_s": round(c.decode_tok_s, 3),
            "min_task_recovery": round(min(c.task_recovery.values()), 4) if c.task_recovery else None,
            "gate": "pass" if gate else "fail",
            "pareto": c.version in front,
            "champion": c.version == (winner or (champion.version if champion else None)),
            "reason": why,
        })
    return winner, rows


def input_verdict(given: Candidate, champion: Candidate | None, target: str, promotion: PromotionSpec) -> str:
    """One line: does champion-<target> beat the recipe's input file on the objective, and by how much."""
    metric = _OBJECTIVE_METRIC[promotion.objective]
    ours = getattr(given, metric)
    if champion is None:
        return f"the input file is still best: no candidate passes the gate and budgets (the input's {metric} {ours:.3f})"
    theirs = getattr(champion, metric)
    name = f"champion-{target} ({champion.variant})"
    if _OBJECTIVES[promotion.objective](champion)[0] < _OBJECTIVES[promotion.objective](given)[0]:
        return f"{name} beats the input file on {metric}: {theirs:.3f} vs {ours:.3f} ({(theirs - ours) / ours * 100:+.1f} %), ppl {champion.ppl_delta_pct:+.2f} % vs {given.ppl_delta_pct:+.2f} %"
    return f"the input file is still best: {name} has {metric} {theirs:.3f}, the input {ours:.3f}"


def _current_champion(mlflow, name: str, target: str) -> Candidate | None:
    from mlflow.exceptions import MlflowException

    try:
        version = mlflow.get_model_version_by_alias(name, alias_for(target))
    except MlflowException:
        return None
    metrics = mlflow.get_run(evaluation_run_id(version)).data.metrics
    return Candidate(
        variant=version.tags.get(f"{TAG}variant", "?"),
        version=str(version.version),
        runtime=version.tags.get(f"{TAG}runtime", "transformers"),
        ppl=metrics["ppl"],
        ppl_delta_pct=metrics["ppl_delta_pct"],
        size_mb=metrics["size_mb"],
        decode_tok_s=metrics["decode_tok_s"],
    )


def describe_decisions(mlflow, model_name: str, target: str, rows: list[dict[str, Any]], run_id: str, replaced: Candidate | None) -> None:
    """Each candidate version's description says what promotion decided (tasks.card); a champion
    this run replaced says by which version."""
    for row in rows:
        version = mlflow.get_model_version(model_name, row["version"])
        since = version.tags.get(CHAMPION_SINCE) if row["champion"] else None
        text = promotion_text(row, rows, target, since, run_id)
        mlflow.update_model_version(model_name, row["version"], description=with_promotion(version.description or "", text))
    if replaced is not None and all(r["version"] != replaced.version for r in rows):
        winner = next(r for r in rows if r["champion"])
        version = mlflow.get_model_version(model_name, replaced.version)
        text = f"Was champion-{target} until run `{run_id}`, which promoted version {winner['version']} ({winner['variant']}): {winner['reason']}."
        mlflow.update_model_version(model_name, replaced.version, description=with_promotion(version.description or "", text))


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def promote_champion(
    tracking_uri: str, model_name: str, target: str, candidates: list[Candidate], promotion: PromotionSpec, run_id: str,
    given: Candidate | None = None,
) -> list[dict[str, Any]]:
    """Move champion-<target> to the best gated candidate when it beats the current champion, and
    write the decision into every candidate's version description. `run_id`: the flow's MLflow
    parent run; `given`: the recipe's own GGUF file as measured on the target, whose row says
    whether the champion beats it."""
    mlflow = client(tracking_uri)
    champion = _current_champion(mlflow, model_name, target) if candidates else None
    winner, rows = decide(candidates, champion, promotion)
    if winner is not None:
        mlflow.set_registered_model_alias(model_name, alias_for(target), winner)
        mlflow.set_model_version_tag(model_name, winner, CHAMPION_SINCE, run_id)
        step_logger().info("%s: %s -> version %s", model_name, alias_for(target), winner)
    describe_decisions(mlflow, model_name, target, rows, run_id, champion if winner is not None else None)
    if champion is not None and all(r["version"] != champion.version for r in rows):
        rows.append({
            "variant": champion.variant, "runtime": champion.runtime, "version": champion.version, "ppl": round(champion.ppl, 4),
            "ppl_delta_pct": round(champion.ppl_delta_pct, 3), "size_mb": round(champion.size_mb, 3),
            "decode_tok_s": round(champion.decode_tok_s, 3), "gate": "pass", "pareto": None,
            "champion": winner is None, "reason": "current champion (from an earlier run)",
        })
    if given is not None:
        champion_version = next((r["version"] for r in rows if r["champion"]), None)
        chosen = next((c for c in [*candidates, champion] if c is not None and c.version == champion_version), None)
        rows.append({
            "variant": "input", "runtime": given.runtime, "version": "", "ppl": round(given.ppl, 4), "ppl_delta_pct": round(given.ppl_delta_pct, 3),
            "reference": given.reference_runtime, "size_mb": round(given.size_mb, 3), "decode_tok_s": round(given.decode_tok_s, 3),
            "gate": "pass" if rejection(given, promotion) is None else "fail", "pareto": None, "champion": False,
            "reason": input_verdict(given, chosen, target, promotion),
        })
    return [{"target": target, **row} for row in rows]
