"""What one worker measures for a flow run: the base model and every variant on some targets.

`optimize` runs it in-process for the targets of its own work pool; the `byoai-target` flow
(flows/target.py) runs it on another target's pool when `optimize` dispatches work there.
Orchestration only: every number is computed in a task.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from pydantic import BaseModel, Field

from byoai.capability import skip_reason
from byoai.recipe import Recipe, TargetProfile, VariantSpec
from byoai.settings import Settings
from byoai.summary import ResultRow
from tasks.build import build_variant
from tasks.data import TokensRef, prepare_calibration, prepare_perplexity_tokens
from tasks.evaluate import evaluate_artifact
from tasks.lm_eval_tasks import fingerprint
from tasks.model import ModelRef, resolve_model
from tasks.promote import Candidate
from tasks.search import Search
from tasks.tracking import RunRef, log_unbuilt_run, log_variant_run, register_variant


class TargetOutcome(BaseModel):
    """Rows of the run summary and promotion candidates per target, filled in as they are recorded."""

    results: list[ResultRow] = Field(default_factory=list)
    candidates: dict[str, list[Candidate]] = Field(default_factory=dict)

    def merge(self, other: TargetOutcome) -> None:
        self.results += other.results
        for target, candidates in other.candidates.items():
            self.candidates.setdefault(target, []).extend(candidates)

    def unbuilt(self, parent: RunRef, variant: VariantSpec, target: TargetProfile, status: str, reason: str, text: str | None = None) -> None:
        """Record a variant x target that produced nothing: its MLflow child run and its row."""
        log_unbuilt_run(parent, variant, target, status, reason, text)
        self.results.append(ResultRow(variant=variant.name, technique=variant.technique, target=target.name, status=status, reason=reason))


def error_text(state) -> tuple[str, str]:
    """(one line, full traceback) of a failed Prefect state."""
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}", "".join(traceback.format_exception(error))
    return str(state.message), str(state.message)


def _heavy(task, name: str, device: str):
    # Tagged per device: a Prefect concurrency limit on byoai-<device> keeps one heavy job per
    # GPU / CPU worker however many the task runner would start.
    return task.with_options(task_run_name=name, tags=["byoai", f"byoai-{device}"])


@dataclass
class Loop:
    """What every variant measured by one worker shares, and what it has recorded so far."""

    recipe: Recipe
    targets: list[TargetProfile]  # the recipe's targets measured here
    parent: RunRef
    model: ModelRef
    calibration: TokensRef
    perplexity_tokens: TokensRef
    variants_dir: str
    outcome: TargetOutcome
    reference: dict[str, Any] = field(default_factory=dict)  # target -> Metrics of the base model
    builds: dict[tuple, Any] = field(default_factory=dict)  # stage prefix -> future (shared prefixes)

    def skip_or_fail(self, variant: VariantSpec, target: TargetProfile, status: str, reason: str, text: str | None = None) -> None:
        self.outcome.unbuilt(self.parent, variant, target, status, reason, text)

    def runnable(self, variant: VariantSpec) -> list[TargetProfile]:
        """Targets this variant can run on; the others are recorded as skipped, with why."""
        runnable = []
        for target in self.targets:
            if (reason := skip_reason(variant, target)) is None:
                runnable.append(target)
            else:
                self.skip_or_fail(variant, target, "skipped", reason)
        return runnable

    def submit_chain(self, variant: VariantSpec, runnable: list[TargetProfile]) -> list:
        """Submit the variant's stages; each stage's output (a future) is the next one's input."""
        device = "cuda" if any(t.device == "cuda" for t in runnable) else "cpu"
        stages, upstream = [], self.model
        for i, stage in enumerate(variant.stages):
            prefix = (device, *((s.technique, repr(sorted(s.params.items()))) for s in variant.stages[: i + 1]))
            if prefix not in self.builds:
                self.builds[prefix] = _heavy(build_variant, f"build-{variant.name}-{i}-{stage.technique}", device).submit(
                    stage.technique, stage.params, upstream, self.model, self.calibration, device, self.variants_dir
                )
            upstream = self.builds[prefix]
            stages.append(upstream)
        return stages

    def submit_evaluations(self, variant: VariantSpec, runnable: list[TargetProfile], stages: list) -> list:
        """Once its chain is built, evaluate the artifact on each target; a failed stage is recorded."""
        failed = next((i for i, future in enumerate(stages) if future.wait() or future.state.is_failed()), None)
        if failed is not None:
            where = f"stage {failed} ({variant.stages[failed].technique})" if len(variant.stages) > 1 else "build"
            message, text = error_text(stages[failed].state)
            for target in runnable:
                self.skip_or_fail(variant, target, "failed", f"{where} failed: {message}", text)
            return []
        built = [future.result() for future in stages]
        return [
            (variant, target, built, _heavy(evaluate_artifact, f"evaluate-{variant.name}@{target.name}", target.device).submit(
                built[-1], target, self.perplexity_tokens, *self.evaluation_args
            ))
            for target in runnable
        ]

    @property
    def evaluation_args(self) -> tuple:
        """The latency spec, lm-eval spec and its data fingerprint, as evaluate_artifact takes them."""
        tasks = self.recipe.evaluation.tasks
        return self.recipe.evaluation.latency, tasks, fingerprint(tasks) if tasks else None

    def record(self, variant: VariantSpec, target: TargetProfile, built: list, future, tags: dict[str, str] | None = None, note: str = "") -> Candidate | None:
        """Log the child run and register the version of one evaluated variant x target."""
        future.wait()
        if future.state.is_failed():
            message, text = error_text(future.state)
            self.skip_or_fail(variant, target, "failed", f"evaluation failed: {message}", text)
            return None
        metrics, reference = future.result(), self.reference[target.name]
        run_id = log_variant_run(self.parent, variant, target, built, metrics, reference, tags or {})
        version = register_variant(self.parent, self.recipe.name, self.recipe.sha(), variant, target, built[-1], run_id)
        candidate = Candidate.measured(variant.name, version.version, metrics, reference)
        self.outcome.candidates.setdefault(target.name, []).append(candidate)
        self.outcome.results.append(ResultRow(
            variant=variant.name, technique=variant.technique, target=target.name, status="finished",
            ppl=metrics.ppl, ppl_delta_pct=candidate.ppl_delta_pct, size_mb=metrics.size_mb,
            load_s=metrics.load_s, prefill_ms=metrics.prefill_ms, decode_tok_s=metrics.decode_tok_s,
            task_scores={task: score["value"] for task, score in metrics.tasks.items()},
            profile=metrics.profile, device=metrics.device, version=version.version, run_id=run_id, reason=note,
        ))
        return candidate

    def run_variants(self, variants: list[VariantSpec]) -> None:
        """All builds submitted at once (the task runner decides what runs in parallel), then
        evaluations as chains finish, then the records."""
        chains = [(v, runnable, self.submit_chain(v, runnable)) for v in variants if (runnable := self.runnable(v))]
        evaluations = [e for variant, runnable, stages in chains for e in self.submit_evaluations(variant, runnable, stages)]
        for variant, target, built, future in evaluations:
            self.record(variant, target, built, future)

    def run_search(self, variant: VariantSpec) -> None:
        """Trials one after another: each proposal depends on the scores of those before it."""
        search = Search(variant.search, self.recipe.promotion)
        for number in range(variant.search.trials):
            proposal = search.ask()
            if proposal is None:  # the whole grid was tried
                break
            trial, params = proposal
            trial_variant = variant.trial(number, params)
            runnable = self.runnable(trial_variant)
            if not runnable:
                break
            tags = {"byoai.search": variant.name, "byoai.trial": str(number)}
            evaluations = self.submit_evaluations(trial_variant, runnable, self.submit_chain(trial_variant, runnable))
            note = f"trial {number} of {variant.name}: " + ", ".join(f"{k}={v}" for k, v in params.items())
            candidates = [self.record(v, t, built, future, tags, note) for v, t, built, future in evaluations]
            # scored on the first target the trial ran on
            if search.tell(trial, candidates[0] if candidates else None):
                get_run_logger().info("search %s reached stop_at after %d trials", variant.name, number + 1)
                break


def measure_targets(recipe: Recipe, targets: list[TargetProfile], parent: RunRef, outcome: TargetOutcome) -> None:
    """Resolve the model and data, measure the base model (the gate's reference) and every
    variant on `targets`, logging each into the parent MLflow run; rows land in `outcome` as they
    are recorded, so a caller that sees an exception still has what finished."""
    settings = Settings()
    model = resolve_model(recipe.model, str(settings.models_dir()))
    data_dir = str(settings.data_dir())
    loop = Loop(
        recipe=recipe, targets=targets, parent=parent, model=model,
        # Calibration windows are prepared even when no technique calibrates: the build step
        # probes every artifact with a few of them to check its save/reload round trip.
        calibration=prepare_calibration(recipe.calibration, model, data_dir),
        perplexity_tokens=prepare_perplexity_tokens(recipe.evaluation.perplexity, model, data_dir),
        variants_dir=str(settings.variants_dir()),
        outcome=outcome,
    )
    measured = [t for t in targets if any(skip_reason(v, t) is None for v in recipe.variants)]
    # The gate's reference: the base model, measured on each target like every variant.
    base = _heavy(build_variant, "build-reference", "cpu").submit("baseline", {}, model, model, loop.calibration, "cpu", loop.variants_dir)
    reference = {
        t.name: _heavy(evaluate_artifact, f"evaluate-reference@{t.name}", t.device).submit(base, t, loop.perplexity_tokens, *loop.evaluation_args)
        for t in measured
    }
    loop.reference = {name: future.result() for name, future in reference.items()}

    loop.run_variants([v for v in recipe.variants if v.search is None])
    for variant in recipe.variants:
        if variant.search is not None:
            loop.run_search(variant)
