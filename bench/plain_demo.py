"""The demo's numerics as a plain script: the same step functions, no Prefect, no MLflow.

bench/orchestration.py times this against `byoai run` to measure what orchestration costs.
"""

from __future__ import annotations

import sys
import tempfile

from byoai.recipe import load_recipe
from byoai.settings import Settings
from tasks.build import build_variant
from tasks.data import prepare_calibration, prepare_perplexity_tokens
from tasks.evaluate import evaluate_artifact
from tasks.model import resolve_model
from tasks.techniques import TECHNIQUES


def main(recipe_path: str) -> None:
    recipe = load_recipe(recipe_path)
    with tempfile.TemporaryDirectory() as scratch:
        model = resolve_model.fn(recipe.model, str(Settings().models_dir()))
        calibration = prepare_calibration.fn(recipe.calibration, model, scratch)
        tokens = prepare_perplexity_tokens.fn(recipe.evaluation.perplexity, model, scratch)
        base = build_variant.fn("baseline", {}, model, None, "cpu", scratch)
        for target in recipe.targets:
            print("reference", target.name, evaluate_artifact.fn(base, target, tokens, recipe.evaluation.latency).ppl)
        for variant in recipe.variants:
            needs = TECHNIQUES[variant.technique].needs_calibration
            artifact = build_variant.fn(variant.technique, variant.params, model, calibration if needs else None, "cpu", scratch)
            for target in recipe.targets:
                metrics = evaluate_artifact.fn(artifact, target, tokens, recipe.evaluation.latency)
                print(variant.name, target.name, round(metrics.ppl, 3))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/demo.yaml")
