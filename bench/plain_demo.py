"""A recipe's numerics as a plain script: the same step functions, no Prefect, no MLflow, no registry.

bench/orchestration.py times this against `byoai run` to measure what orchestration costs. It does
the work the flow does for the recipe's targets on this worker: the reference, the input GGUF
(when the model is one), every variant's chain, and each evaluation in every runtime that runs it.
Usage: python bench/plain_demo.py [RECIPE]
"""

from __future__ import annotations

import sys
import tempfile

from byoai.capability import runtime_skip_reason, skip_reason
from byoai.recipe import load_recipe
from byoai.settings import Settings
from byoai.tasks.build import build_variant, gguf_input_artifact
from byoai.tasks.data import prepare_calibration, prepare_perplexity_tokens
from byoai.tasks.evaluate import evaluate_in_runtime
from byoai.tasks.lm_eval_tasks import fingerprint
from byoai.tasks.model import resolve_model
from byoai.tasks.runtime_build import build_runtime
from byoai.tasks.runtimes import runtimes_for


def main(recipe_path: str) -> None:
    recipe = load_recipe(recipe_path)
    settings = Settings()
    tasks = recipe.evaluation.tasks
    evaluation = (recipe.evaluation.latency, tasks, fingerprint(tasks) if tasks else None)
    builds: dict[tuple[str, str], object] = {}

    def measure(artifact, target, label):
        for runtime in (r for r in target.runtimes if r in runtimes_for(artifact.format) and runtime_skip_reason(target, r) is None):
            if (target.name, runtime) not in builds:
                builds[target.name, runtime] = build_runtime.fn(runtime, target.runtimes[runtime], str(settings.cache_dir))
            metrics = evaluate_in_runtime.fn(artifact, target, runtime, builds[target.name, runtime], tokens, *evaluation)
            print(label, target.name, runtime, round(metrics.ppl, 3), round(metrics.decode_tok_s, 1))

    with tempfile.TemporaryDirectory() as scratch:
        model = resolve_model.fn(recipe.model, str(settings.models_dir()))
        calibration = prepare_calibration.fn(recipe.calibration, model, scratch)
        tokens = prepare_perplexity_tokens.fn(recipe.evaluation.perplexity, model, scratch)
        targets = [t for t in recipe.targets if any(skip_reason(v, t) is None for v in recipe.variants)]
        base = build_variant.fn("baseline", {}, model, model, calibration, "cpu", scratch)
        for target in targets:
            measure(base, target, "reference")
        if model.gguf:
            for target in targets:
                measure(gguf_input_artifact.fn(model, scratch), target, "input")
        for variant in recipe.variants:
            runnable = [t for t in targets if skip_reason(variant, t) is None]
            if not runnable:
                continue
            upstream = model
            for stage in variant.stages:
                upstream = build_variant.fn(stage.technique, stage.params, upstream, model, calibration, "cpu", scratch)
            for target in runnable:
                measure(upstream, target, variant.name)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/demo.yaml")
