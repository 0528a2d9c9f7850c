"""The champion rule, decided without I/O: gate first, then a strict win on the objective."""

from __future__ import annotations

from byoai.recipe import PromotionSpec
from byoai.tasks.promote import Candidate, decide


def c(variant, version, ppl_delta, size, speed=10.0):
    return Candidate(variant=variant, version=version, ppl=10 * (1 + ppl_delta / 100), ppl_delta_pct=ppl_delta, size_mb=size, decode_tok_s=speed)


SMALLEST = PromotionSpec.model_validate({"gate": {"max_ppl_increase_pct": 10}, "objective": "smallest"})


def test_first_champion_is_smallest_that_passes_the_gate():
    winner, rows = decide([c("base", "1", 0, 500), c("rtn", "2", 30, 150), c("gptq", "3", 8, 150)], None, SMALLEST)
    assert winner == "3"
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["rtn"]["gate"] == "fail" and "gate failed" in by_variant["rtn"]["reason"]
    assert by_variant["gptq"]["champion"] and not by_variant["base"]["champion"]


def test_size_tie_is_broken_by_perplexity():
    winner, _ = decide([c("a", "1", 5, 150), c("b", "2", 2, 150)], None, SMALLEST)
    assert winner == "2"


def test_champion_kept_unless_strictly_beaten():
    champion = c("old", "7", 3, 150)
    assert decide([c("same-size", "8", 1, 150)], champion, SMALLEST)[0] is None
    assert decide([c("bigger", "9", 0, 400)], champion, SMALLEST)[0] is None
    assert decide([c("smaller", "10", 9, 120)], champion, SMALLEST)[0] == "10"


def test_rerun_of_the_champion_moves_nothing():
    champion = c("gptq", "3", 8, 150)
    winner, rows = decide([c("gptq", "3", 8, 150)], champion, SMALLEST)
    assert winner is None and rows[0]["reason"] == "already champion" and rows[0]["champion"]


def test_nothing_passes_the_gate():
    winner, rows = decide([c("rtn", "2", 30, 150)], c("base", "1", 0, 500), SMALLEST)
    assert winner is None and "gate failed" in rows[0]["reason"]


def test_fastest_and_best_quality_objectives():
    pool = [c("fast", "1", 5, 300, speed=50), c("good", "2", 1, 300, speed=20)]
    assert decide(pool, None, PromotionSpec(objective="fastest"))[0] == "1"
    assert decide(pool, None, PromotionSpec(objective="best_quality"))[0] == "2"


def test_pareto_front_and_budgets():
    base, small, fast = c("base", "1", 0, 500, speed=30), c("small", "2", 8, 150, speed=20), c("worse", "3", 9, 160, speed=19)
    winner, rows = decide([base, small, fast], None, PromotionSpec.model_validate({"gate": {"max_ppl_increase_pct": 10}, "objective": "best_quality", "max_size_mb": 200}))
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["base"]["pareto"] and by_variant["small"]["pareto"] and not by_variant["worse"]["pareto"]
    # best quality within 200 MB: the base model is better but over budget
    assert winner == "2" and by_variant["base"]["reason"].startswith("over budget: 500.0 MB > max_size_mb 200")
    slow_ok = PromotionSpec.model_validate({"objective": "smallest", "min_decode_tok_s": 25})
    assert decide([base, small], None, slow_ok)[0] == "1"
