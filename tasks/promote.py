"""promote_champion: move `champion-<target>` only to a gated variant that beats the champion."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from byoai.log import step_logger
from byoai.recipe import PromotionSpec, SloSpec
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
    # served to concurrent users: str(users) -> {ttft_ms_p95, itl_ms_p95, tok_s} (tasks.serving);
    # empty when not served, and then `serving_note` says why (e.g. "no serving runtime")
    serving: dict[str, dict[str, float]] = {}
    serving_note: str = ""
    # where decode_tok_s comes from: the protocol (llama-cpp-python, transformers, ...) or, for a
    # candidate served at 1 user, llama-server (what `fastest` compares when the recipe serves)
    decode_source: str = "protocol"

    @classmethod
    def measured(cls, variant: str, version: str, metrics: Metrics, reference: Metrics, served=None, serving_note: str = "") -> Candidate:
        return cls(
            variant=variant,
            version=version,
            runtime=metrics.runtime,
            reference_runtime=reference.runtime,
            ppl=metrics.ppl,
            ppl_delta_pct=ppl_delta_pct(metrics, reference),
            size_mb=metrics.size_mb,
            decode_tok_s=one_user.tok_s_per_user if (one_user := served.at(1) if served else None) else metrics.decode_tok_s,
            decode_source="llama-server, 1 user" if one_user else "protocol",
            task_recovery=recovery(metrics.tasks, reference.tasks),
            serving={str(level.users): {k: getattr(level, k) for k in SERVING_KEYS} for level in served.levels} if served else {},
            serving_note=serving_note,
        )


SERVING_KEYS = ("ttft_ms_p95", "itl_ms_p95", "tok_s")


def slo_misses(level: dict[str, float] | None, slo: SloSpec) -> str | None:
    """How one level misses the SLO's percentiles, or None when it meets them."""
    if level is None:
        return "not measured"
    misses = [f"p95 {name} {level[key]:.0f} ms > {limit:g} ms"
              for name, key, limit in (("TTFT", "ttft_ms_p95", slo.p95_ttft_ms), ("ITL", "itl_ms_p95", slo.p95_itl_ms)) if level[key] > limit]
    return ", ".join(misses) or None


def served_users(c: Candidate, slo: SloSpec) -> int:
    """Capacity: the most concurrent users at which the candidate meets the SLO's percentiles
    (0: at no level, not served, or an earlier champion measured without a serving profile)."""
    return max((int(users) for users, level in c.serving.items() if slo_misses(level, slo) is None), default=0)


def slo_text(c: Candidate, slo: SloSpec) -> str:
    """One line for the report and promotion.json: up to how many users the SLO holds."""
    if not c.serving:
        return c.serving_note or "no serving metrics (capacity 0)"
    users = served_users(c, slo)
    at = slo_misses(c.serving.get(str(slo.users)), slo)
    head = f"meets the SLO up to {users} users" if users else "meets the SLO at no level"
    return head + (f"; at {slo.users} users: {at}" if at else "")


# A version tag: the MLflow parent run that made this version its target's champion.
CHAMPION_SINCE = f"{TAG}champion_since"


def alias_for(target: str) -> str:
    return f"champion-{target}"


def _top_level_tok_s(c: Candidate, users: int) -> float:
    return (c.serving.get(str(users)) or {}).get("tok_s", 0.0)


def objective_key(promotion: PromotionSpec):
    """Sort key of candidates under the promotion's objective, smaller is better; perplexity
    breaks ties, then the name (a stable order). capacity: the most users within the SLO, ties
    to the higher total throughput at that level."""
    if promotion.objective == "smallest":
        return lambda c: (round(c.size_mb, 3), c.ppl, c.variant)
    if promotion.objective == "fastest":
        return lambda c: (-round(c.decode_tok_s, 3), c.ppl, c.variant)
    if promotion.objective == "best_quality":
        return lambda c: (c.ppl, round(c.size_mb, 3), c.variant)
    slo = promotion.slo
    return lambda c: (-served_users(c, slo), -round(_top_level_tok_s(c, served_users(c, slo)), 3), c.ppl, c.variant)


def objective_metric(promotion: PromotionSpec) -> str:
    return {"smallest": "size_mb", "fastest": "decode_tok_s", "best_quality": "ppl", "capacity": "users within the SLO"}[promotion.objective]


def objective_value(c: Candidate, promotion: PromotionSpec) -> float:
    """The candidate's value of the objective's metric (capacity: users within the SLO)."""
    if promotion.objective == "capacity":
        return served_users(c, promotion.slo)
    return getattr(c, objective_metric(promotion))


def _shown(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if float(value).is_integer() else f"{value:.3f}"


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
    slo = promotion.slo
    if slo is not None:
        if not c.serving:
            return f"slo failed: {c.serving_note or 'no serving metrics'}"
        if (misses := slo_misses(c.serving.get(str(slo.users)), slo)) is not None:
            return f"slo failed at {slo.users} users: {misses}"
    return None


def decide(candidates: list[Candidate], champion: Candidate | None, promotion: PromotionSpec) -> tuple[str | None, list[dict[str, Any]]]:
    """Pure decision: (version to alias or None to keep, one explained row per candidate)."""
    key = objective_key(promotion)
    metric = objective_metric(promotion)

    def value(c: Candidate) -> str:
        return _shown(objective_value(c, promotion))

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
        winner, verdict = best.version, f"beats champion v{champion.version} on {metric}: {value(best)} vs {value(champion)}"
    else:
        winner, verdict = None, f"does not beat champion v{champion.version} on {metric} ({value(best)} vs {value(champion)}); champion kept"
    if champion is not None and winner is not None and promotion.objective == "capacity" and not champion.serving:
        verdict += " (the champion has no serving metrics: capacity 0)"
    rows = []
    for c in sorted(candidates, key=key):
        rejected = rejection(c, promotion)
        gate = rejected is None or not rejected.startswith("gate failed")
        if rejected:
            why = rejected
        elif c is best:
            why = verdict
        else:
            why = f"passes the gate; {metric} {value(c)} worse than {best.variant}"
        rows.append({
            "variant": c.variant,
            "runtime": c.runtime,
            "version": c.version,
            "ppl": round(c.ppl, 4),
            "ppl_delta_pct": round(c.ppl_delta_pct, 3),
            "reference": c.reference_runtime,
            "size_mb": round(c.size_mb, 3),
            "decode_tok_s": round(c.decode_tok_s, 3),
            "decode_from": c.decode_source,
            "min_task_recovery": round(min(c.task_recovery.values()), 4) if c.task_recovery else None,
            "gate": "pass" if gate else "fail",
            "pareto": c.version in front,
            "champion": c.version == (winner or (champion.version if champion else None)),
            "reason": why,
            **({"slo": slo_text(c, promotion.slo), "slo_users": served_users(c, promotion.slo)} if promotion.slo else {}),
        })
    return winner, rows


def input_verdict(given: Candidate, champion: Candidate | None, target: str, promotion: PromotionSpec) -> str:
    """One line: does champion-<target> beat the recipe's input file on the objective, and by how much."""
    metric, ours = objective_metric(promotion), objective_value(given, promotion)
    if champion is None:
        return f"the input file is still best: no candidate passes the gate and budgets (the input's {metric} {_shown(ours)})"
    theirs = objective_value(champion, promotion)
    name = f"champion-{target} ({champion.variant})"
    if rejection(champion, promotion) is None and (why := rejection(given, promotion)) is not None:
        return f"{name} beats the input file, which fails the gate or a budget ({why})"
    if objective_key(promotion)(champion)[0] < objective_key(promotion)(given)[0]:
        change = f" ({(theirs - ours) / ours * 100:+.1f} %)" if ours else ""
        return f"{name} beats the input file on {metric}: {_shown(theirs)} vs {_shown(ours)}{change}, ppl {champion.ppl_delta_pct:+.2f} % vs {given.ppl_delta_pct:+.2f} %"
    return f"the input file is still best: {name} has {metric} {_shown(theirs)}, the input {_shown(ours)}"


def _current_champion(mlflow, name: str, target: str) -> Candidate | None:
    from mlflow.exceptions import MlflowException

    try:
        version = mlflow.get_model_version_by_alias(name, alias_for(target))
    except MlflowException:
        return None
    metrics = mlflow.get_run(evaluation_run_id(version)).data.metrics
    serving: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():  # serving.u<N>.<metric>, when it was served
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "serving" and parts[1][1:].isdigit() and parts[2] in SERVING_KEYS:
            serving.setdefault(parts[1][1:], {})[parts[2]] = value
    return Candidate(
        serving={users: level for users, level in serving.items() if len(level) == len(SERVING_KEYS)},
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
            **({"slo": slo_text(given, promotion.slo), "slo_users": served_users(given, promotion.slo)} if promotion.slo else {}),
        })
    return [{"target": target, **row} for row in rows]
