"""What one worker measures for a flow run: the base model and every variant on some targets.

`optimize` runs it in-process for the targets of its own work pool; the `byoai-target` flow
(flows/target.py) runs it on another target's pool when `optimize` dispatches work there.
Orchestration only: every number is computed in a task.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from pydantic import BaseModel, Field

from byoai import progress
from byoai.capability import runtime_skip_reason, skip_reason
from byoai.memory import shape_of_folder
from byoai.plan import MemoryPlan, capacity_here, plan_memory, reference_variant
from byoai.recipe import INPUT_VARIANT, LatencySpec, Recipe, TargetProfile, VariantSpec
from byoai.settings import Settings
from byoai.summary import ResultRow
from byoai.tasks.build import build_variant, gguf_input_artifact
from byoai.tasks.card import Measured, measured_section, model_card, version_description
from byoai.tasks.data import TokensRef, prepare_calibration, prepare_perplexity_tokens
from byoai.tasks.evaluate import evaluate_in_runtime
from byoai.tasks.lm_eval_tasks import fingerprint
from byoai.tasks.model import ModelRef, resolve_model
from byoai.tasks.promote import Candidate
from byoai.tasks.runtime_build import build_runtime
from byoai.tasks.runtimes import RUNTIMES, runtimes_for
from byoai.tasks.serving import ServingMetrics, serve_in_runtime, speculate_in_runtime
from byoai.tasks.search import Search
from byoai.flows.auto_search import AutoSearch
from byoai.tasks.tracking import RunRef, complete_card, log_input_run, log_memory_plan, log_serving, log_unbuilt_run, log_variant_run, register_variant, tag_version

# A speculative pair is registered only above this 1-user decode speed-up over its main model
# alone: the same measurement repeated on this project's 2-core worker moves by about ±10 %.
MIN_SPEEDUP = 1.1


class WrittenCard(BaseModel):
    """Where a registration wrote an artifact's model card (an artifact path of an MLflow run)."""

    run_id: str
    path: str


class TargetOutcome(BaseModel):
    """Rows of the run summary and promotion candidates per target, filled in as they are recorded."""

    results: list[ResultRow] = Field(default_factory=list)
    candidates: dict[str, list[Candidate]] = Field(default_factory=dict)
    # target -> the recipe's own GGUF file as measured there: what a champion must beat to be worth it
    inputs: dict[str, Candidate] = Field(default_factory=dict)
    # artifact sha -> what was measured of it on every target, and where its card was written:
    # a card written on one pool is completed with the other pools' measurements (complete_cards)
    measured: dict[str, list[Measured]] = Field(default_factory=dict)
    cards: dict[str, WrittenCard] = Field(default_factory=dict)

    def merge(self, other: TargetOutcome) -> None:
        self.results += other.results
        for target, candidates in other.candidates.items():
            self.candidates.setdefault(target, []).extend(candidates)
        self.inputs |= other.inputs
        for sha, measured in other.measured.items():
            self.measured.setdefault(sha, []).extend(measured)
        self.cards |= other.cards

    def unbuilt(self, parent: RunRef, variant: VariantSpec, target: TargetProfile, status: str, reason: str, text: str | None = None,
                runtime: str = "", profile: dict[str, float] | None = None) -> None:
        """Record a variant x target (x runtime) that produced nothing: its MLflow child run and its
        row (with what was measured of it, e.g. a speculative pair's numbers, in `profile`)."""
        log_unbuilt_run(parent, variant, target, status, reason, text, runtime)
        progress.emit(status, variant.name, target.name, runtime, reason)
        self.results.append(ResultRow(variant=variant.name, technique=variant.technique, target=target.name, runtime=runtime, status=status,
                                      reason=reason, profile=profile or {}))


def measured_line(metrics, ppl_delta_pct: float) -> str:
    return f"ppl {metrics.ppl:.3f} ({ppl_delta_pct:+.1f} %), {metrics.size_mb:.0f} MB, {metrics.decode_tok_s:.1f} tok/s"


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
    memory: MemoryPlan
    reference: dict[str, Any] = field(default_factory=dict)  # target -> Metrics of the base model
    reference_builds: dict[str, tuple[Any, str]] = field(default_factory=dict)  # target -> (its artifact future, runtime)
    builds: dict[tuple, tuple[str, Any]] = field(default_factory=dict)  # stage prefix -> (task run name, future): shared prefixes
    runtime_builds: dict[tuple[str, str], Any] = field(default_factory=dict)  # (target, runtime) -> future
    served: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # (variant, target, runtime) -> serving future
    artifacts: dict[str, Any] = field(default_factory=dict)  # variant -> its built artifact (once recorded)
    measured: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # (variant, target, runtime) -> Metrics

    def skip_or_fail(self, variant: VariantSpec, target: TargetProfile, status: str, reason: str, text: str | None = None, runtime: str = "") -> None:
        self.outcome.unbuilt(self.parent, variant, target, status, reason, text, runtime)

    def runtime_build(self, target: TargetProfile, runtime: str):
        """The target's build of a runtime (compiled once per flags and host, then cached)."""
        if (target.name, runtime) not in self.runtime_builds:
            self.runtime_builds[target.name, runtime] = build_runtime.with_options(
                task_run_name=f"runtime-{runtime}@{target.name}", tags=["byoai", "byoai-cpu"]
            ).submit(runtime, target.runtimes[runtime], str(Settings().cache_dir))
        return self.runtime_builds[target.name, runtime]

    def measurable(self, variant: VariantSpec, target: TargetProfile, artifact_format: str) -> list[tuple[str, Any]]:
        """(runtime, build future) for each of the target's runtimes that runs this format here;
        a runtime this worker cannot build or run is recorded as skipped, with why."""
        runtimes = [r for r in target.runtimes if r in runtimes_for(artifact_format)]
        if not runtimes:
            self.skip_or_fail(variant, target, "skipped", f"target {target.name} has no runtime for {artifact_format} artifacts (its runtimes: {', '.join(target.runtimes)})")
        out = []
        for runtime in runtimes:
            if (reason := runtime_skip_reason(target, runtime)) is not None:
                self.skip_or_fail(variant, target, "skipped", reason, runtime=runtime)
                continue
            build = self.runtime_build(target, runtime)
            if build.wait() or build.state.is_failed():
                message, text = error_text(build.state)
                self.skip_or_fail(variant, target, "failed", f"building runtime {runtime} failed: {message}", text, runtime)
                continue
            out.append((runtime, build))
        return out

    def evaluate(self, artifact, target: TargetProfile, runtime: str, build, name: str, rung: tuple[int, TokensRef, LatencySpec | None] | None = None,
                 known_nll: tuple[float, ...] = ()):
        """Submit one evaluation; its row waits until a runner slot starts it (the task then says
        evaluating). `rung` (number, its windows, a short latency profile or None): an auto
        search's low-fidelity measurement, of decode speed alone with a latency profile, of
        perplexity on the windows without. `known_nll`: the full protocol's first windows, scored
        by the search's last rung."""
        task_name = f"evaluate-{name}@{target.name}-{runtime}" + (f"-rung{rung[0]}" + ("-speed" if rung[2] else "") if rung else "")
        progress.stands_for(task_name, name, target.name, runtime)
        progress.emit("waiting", name, target.name, runtime)
        evaluation = _heavy(evaluate_in_runtime, task_name, target.device)
        if rung is not None:
            _, windows, latency = rung
            parts = "speed" if latency else "perplexity"
            return evaluation.submit(artifact, target, runtime, build, windows, latency or self.recipe.evaluation.latency, parts=parts)
        return evaluation.submit(artifact, target, runtime, build, self.perplexity_tokens, *self.evaluation_args, known_nll=known_nll)

    def evaluate_candidate(self, artifact, target: TargetProfile, runtime: str, build, name: str, known_nll: tuple[float, ...] = ()):
        """A candidate's full evaluation and, with a serving profile and a runtime that serves,
        its serving measurement, submitted right after it: with one heavy step at a time (the
        default) the task runner starts them in that order, so they never share the cores."""
        evaluation = self.evaluate(artifact, target, runtime, build, name, known_nll=known_nll)
        serving = self.recipe.evaluation.serving
        if serving is not None and RUNTIMES[runtime].server_command is not None:
            task_name = f"serve-{name}@{target.name}-{runtime}"
            progress.stands_for(task_name, name, target.name, runtime)
            self.served[name, target.name, runtime] = _heavy(serve_in_runtime, task_name, target.device).submit(
                artifact, target, runtime, build, self.perplexity_tokens, serving,
            )
        return evaluation

    def served_metrics(self, name: str, target: TargetProfile, runtime: str) -> tuple[ServingMetrics | None, str]:
        """(its serving measurement, "") or (None, why there is none); (None, "") without a profile."""
        if self.recipe.evaluation.serving is None:
            return None, ""
        future = self.served.get((name, target.name, runtime))
        if future is None:
            return None, f"no serving runtime ({runtime} has no server)"
        future.wait()
        if future.state.is_failed():
            message, text = error_text(future.state)
            get_run_logger().warning("serving %s@%s in %s failed: %s", name, target.name, runtime, text)
            return None, f"serving failed: {message}"
        return future.result(), ""

    def runnable(self, variant: VariantSpec) -> list[TargetProfile]:
        """Targets this variant can run on; the others are recorded as skipped, with why."""
        runnable = []
        for target in self.targets:
            if (reason := skip_reason(variant, target) or self.memory_skip_reason(variant, target)) is None:
                runnable.append(target)
            else:
                self.skip_or_fail(variant, target, "skipped", reason)
        return runnable

    def memory_skip_reason(self, variant: VariantSpec, target: TargetProfile) -> str | None:
        """Why the memory plan says this variant cannot run here (before anything loads)."""
        if target.name not in self.reference:
            return f"the gate's reference does not fit on this worker ({self.memory.of('reference', target.name).skip_reason()})"
        planned = self.memory.of(variant.name, target.name)
        return planned.skip_reason() if planned else None

    def planned_peak(self, variant: str, target: str) -> dict[str, float]:
        planned = self.memory.of(variant, target)
        if planned is None:
            return {}
        return {"plan.peak_mem_mb": planned.peak_host / 1e6, **({"plan.peak_device_mem_mb": planned.peak_device / 1e6} if planned.peak_device else {})}

    def submit_chain(self, variant: VariantSpec, runnable: list[TargetProfile]) -> list:
        """Submit the variant's stages; each stage's output (a future) is the next one's input."""
        device = "cuda" if any(t.device == "cuda" for t in runnable) else "cpu"
        for target in runnable:
            progress.emit("waiting", variant.name, target.name)
        stages, upstream = [], self.model
        for i, stage in enumerate(variant.stages):
            prefix = (device, *((s.technique, repr(sorted(s.params.items()))) for s in variant.stages[: i + 1]))
            if prefix not in self.builds:
                task_name = f"build-{variant.name}-{i}-{stage.technique}"
                self.builds[prefix] = task_name, _heavy(build_variant, task_name, device).submit(
                    stage.technique, stage.params, upstream, self.model, self.calibration, device, self.variants_dir
                )
            task_name, upstream = self.builds[prefix]
            for target in runnable:  # a shared stage works for every variant that starts with it
                progress.stands_for(task_name, variant.name, target.name)
            stages.append(upstream)
        return stages

    def built_chain(self, variant: VariantSpec, runnable: list[TargetProfile], stages: list) -> list | None:
        """The chain's artifacts once built; None when a stage failed (recorded on every target)."""
        failed = next((i for i, future in enumerate(stages) if future.wait() or future.state.is_failed()), None)
        if failed is None:
            return [future.result() for future in stages]
        where = f"stage {failed} ({variant.stages[failed].technique})" if len(variant.stages) > 1 else "build"
        message, text = error_text(stages[failed].state)
        for target in runnable:
            self.skip_or_fail(variant, target, "failed", f"{where} failed: {message}", text)
        return None

    def submit_evaluations(self, variant: VariantSpec, runnable: list[TargetProfile], stages: list) -> list:
        """Once its chain is built, evaluate the artifact on each target; a failed stage is recorded."""
        built = self.built_chain(variant, runnable, stages)
        if built is None:
            return []
        return [
            (variant, target, runtime, built, self.evaluate_candidate(built[-1], target, runtime, build, variant.name))
            for target in runnable
            for runtime, build in self.measurable(variant, target, built[-1].format)
        ]

    @property
    def evaluation_args(self) -> tuple:
        """The latency spec, lm-eval spec and its data fingerprint, as evaluate_in_runtime takes them."""
        tasks = self.recipe.evaluation.tasks
        return self.recipe.evaluation.latency, tasks, fingerprint(tasks) if tasks else None

    def record_variant(self, variant: VariantSpec, evaluations: list, tags: dict[str, str] | None = None, note: str = "") -> list[Candidate | None]:
        """Log and register one variant's evaluations (target x runtime) once all of them are in:
        its model card holds what it measured on every target."""
        for *_, future in evaluations:
            future.wait()
        measured = [
            Measured(target=target.name, runtime=runtime, metrics=future.result(), reference=self.reference[target.name],
                     served=self.served_metrics(variant.name, target, runtime)[0])
            for _, target, runtime, _, future in evaluations if not future.state.is_failed()
        ]
        card = model_card(self.recipe, variant, evaluations[0][3], measured, self.model) if measured else ""
        recorded = [self.record(v, target, runtime, built, future, card, tags, note) for v, target, runtime, built, future in evaluations]
        if measured:
            self.outcome.measured.setdefault(evaluations[0][3][-1].sha, []).extend(measured)
        return recorded

    def record(self, variant: VariantSpec, target: TargetProfile, runtime: str, built: list, future, card: str, tags: dict[str, str] | None = None, note: str = "") -> Candidate | None:
        """Log the child run and register the version of one evaluated variant x target x runtime."""
        if future.state.is_failed():
            message, text = error_text(future.state)
            self.skip_or_fail(variant, target, "failed", f"evaluation failed: {message}", text, runtime)
            return None
        metrics, reference = future.result(), self.reference[target.name]
        build = self.runtime_build(target, runtime).result()
        served, no_serving = self.served_metrics(variant.name, target, runtime)
        self.artifacts[variant.name] = built[-1]
        self.measured[variant.name, target.name, runtime] = metrics
        progress.emit("registering", variant.name, target.name, runtime)
        run_id = log_variant_run(self.parent, variant, target, built, metrics, reference, build, tags or {}, self.planned_peak(variant.name, target.name))
        log_serving(self.parent, run_id, served, no_serving)
        description = version_description(variant, Measured(target=target.name, runtime=runtime, metrics=metrics, reference=reference), build.key)
        version = register_variant(self.parent, self.recipe.name, self.recipe.sha(), variant, target, built[-1], run_id, build, card, description)
        if version.card_path:
            self.outcome.cards[built[-1].sha] = WrittenCard(run_id=run_id, path=version.card_path)
        candidate = Candidate.measured(variant.name, version.version, metrics, reference, served, no_serving)
        self.outcome.candidates.setdefault(target.name, []).append(candidate)
        if no_serving.startswith("serving failed"):
            note = "; ".join(filter(None, [note, no_serving]))
        self.outcome.results.append(ResultRow.measured(
            variant.name, variant.technique, target.name, metrics, candidate.ppl_delta_pct, version.version, run_id, note,
            built[-1].facts.get("predicted_kl"), served.flat() if served else {},
        ))
        progress.emit("done", variant.name, target.name, runtime, measured_line(metrics, candidate.ppl_delta_pct))
        return candidate

    def record_input(self, artifact, target: TargetProfile, runtime: str, future) -> None:
        """The untouched input GGUF run in llama.cpp: a row in every report, never a candidate."""
        future.wait()
        if future.state.is_failed():
            message, _ = error_text(future.state)
            self.outcome.results.append(ResultRow(variant="input", technique="baseline", target=target.name, runtime=runtime, status="failed", reason=f"evaluation failed: {message}"))
            progress.emit("failed", "input", target.name, runtime, f"evaluation failed: {message}")
            return
        metrics, reference = future.result(), self.reference[target.name]
        served, no_serving = self.served_metrics("input", target, runtime)
        run_id = log_input_run(self.parent, target, artifact, metrics, reference, self.runtime_build(target, runtime).result())
        log_serving(self.parent, run_id, served, no_serving)
        note = "the recipe's input file as it is (not a candidate)"
        measured = Candidate.measured("input", "", metrics, reference, served, no_serving)
        self.outcome.inputs[target.name] = measured
        self.outcome.results.append(ResultRow.measured("input", "baseline", target.name, metrics, measured.ppl_delta_pct, None, run_id, note,
                                                       serving=served.flat() if served else {}))
        progress.emit("done", "input", target.name, runtime, measured_line(metrics, measured.ppl_delta_pct))

    def input_runs(self, targets: list[TargetProfile]) -> tuple[Any, list[tuple[TargetProfile, str, Any]]] | None:
        """When the recipe's model is a GGUF file: that file as an artifact, and each (target,
        runtime, runtime build) where a runtime runs GGUF; None otherwise."""
        targets = [t for t in targets if any(r in runtimes_for("gguf") for r in t.runtimes)]
        if self.model.gguf is None or not targets:
            return None
        artifact = gguf_input_artifact.with_options(task_run_name="stage-input-gguf")(self.model, self.variants_dir)
        return artifact, [(target, runtime, build) for target in targets for runtime, build in self.measurable(INPUT_VARIANT, target, "gguf")]

    def run_input(self, artifact, runs: list[tuple[TargetProfile, str, Any]], known_nll: dict[tuple[str, str], tuple[float, ...]] | None = None) -> None:
        """Measure the input file as it is, in full, on each of `runs` (Loop.input_runs); `known_nll`
        (target, runtime) -> its first windows' NLLs from an auto search's last rung."""
        evaluations = [  # served too when the recipe serves: a champion must beat how the input file serves
            (target, runtime, self.evaluate_candidate(artifact, target, runtime, build, "input", (known_nll or {}).get((target.name, runtime), ())))
            for target, runtime, build in runs
        ]
        for target, runtime, future in evaluations:
            self.record_input(artifact, target, runtime, future)

    def run_variants(self, variants: list[VariantSpec]) -> None:
        """All builds submitted at once (the task runner decides what runs in parallel), then
        evaluations as chains finish, then the records."""
        chains = [(v, runnable, self.submit_chain(v, runnable)) for v in variants if (runnable := self.runnable(v))]
        evaluations = [(variant, self.submit_evaluations(variant, runnable, stages)) for variant, runnable, stages in chains]
        for variant, of_variant in evaluations:
            if of_variant:
                self.record_variant(variant, of_variant)

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
            candidates = self.record_variant(trial_variant, evaluations, tags, note) if evaluations else []
            # scored on the first target the trial ran on
            if search.tell(trial, candidates[0] if candidates else None):
                get_run_logger().info("search %s reached stop_at after %d trials", variant.name, number + 1)
                break


    def run_speculative(self) -> None:
        """Speculative pairs from the recipe's own GGUF variants (docs/serving.md), one after
        another once every variant is recorded; each is recorded, and registered when it decodes
        faster than its main model alone with the same greedy output."""
        serving = self.recipe.evaluation.serving
        pairs = []
        for target in (t for t in self.targets if serving is not None and "llama_cpp" in t.runtimes):
            served = {c.variant: c for c in self.outcome.candidates.get(target.name, []) if c.runtime == "llama_cpp" and c.serving}
            for variant in self.recipe.variants:
                spec = variant.speculative or self.recipe.speculative
                if spec is None or variant.name not in served:
                    continue
                build = self.runtime_build(target, "llama_cpp").result()
                for name, file, sha in self.drafts_for(served[variant.name], served, spec):
                    task_name = f"speculate-{variant.name}-{name}@{target.name}"
                    progress.stands_for(task_name, f"{variant.name}-spec-{name}", target.name, "llama_cpp")
                    progress.emit("waiting", f"{variant.name}-spec-{name}", target.name, "llama_cpp")
                    future = _heavy(speculate_in_runtime, task_name, target.device).submit(
                        self.artifacts[variant.name], file, sha, name, target, "llama_cpp", build, self.perplexity_tokens, serving, spec,
                    )
                    pairs.append((variant, name, file, target, build, future))
        for pair in pairs:
            self.record_pair(*pair)

    def drafts_for(self, main, served: dict, spec) -> list[tuple[str, str, str]]:
        """(name, GGUF file or "" for n-gram, content sha) of the drafts to pair with `main`."""
        from byoai.files import file_sha256

        def of(name: str) -> tuple[str, str, str]:
            artifact = self.artifacts[name]
            return name, str(Path(artifact.path) / RUNTIMES["llama_cpp"].served_file), artifact.sha

        if spec.drafts == "auto":
            drafts = [of(c.variant) for c in served.values() if c.variant != main.variant and c.size_mb <= main.size_mb / 2]
        else:
            drafts = [of(d) for d in spec.drafts if not d.endswith(".gguf") and d in served and d != main.variant]
            drafts += [(Path(d).stem, d, file_sha256(Path(d))) for d in spec.drafts if d.endswith(".gguf")]
        return drafts + ([("ngram", "", "")] if spec.ngram else [])

    def record_pair(self, variant: VariantSpec, draft: str, file: str, target: TargetProfile, build, future) -> None:
        """A pair with identical output, accepted draft tokens and a measurable speed-up (MIN_SPEEDUP)
        becomes a version of its own (draft.gguf beside model.gguf, the server flags in
        server-args.json); any other is a row saying why not, with its numbers."""
        pair_variant = VariantSpec(name=f"{variant.name}-spec-{draft}", stages=variant.stages)
        future.wait()
        if future.state.is_failed():
            message, text = error_text(future.state)
            self.skip_or_fail(pair_variant, target, "failed", f"speculative pair failed: {message}", text, "llama_cpp")
            return
        measured = future.result()
        pair = measured.pair
        facts = f"acceptance {pair.acceptance:.2f} ({pair.accepted}/{pair.drafted}), {pair.speedup:.2f}x {variant.name}'s 1-user decode"
        why = (f"greedy output differs from {variant.name} alone ({pair.first_difference}); {facts}" if not pair.identical
               # a draft whose tokens are never accepted cannot speed decoding up: its speed-up is noise
               else f"the main model accepted none of the draft's tokens ({facts}; identical output)" if pair.accepted == 0
               else f"not measurably faster than {variant.name} alone ({facts} < {MIN_SPEEDUP:g}x; identical output)" if pair.speedup < MIN_SPEEDUP
               else None)
        if why is not None:
            self.outcome.unbuilt(self.parent, pair_variant, target, "skipped", f"not registered: {why}", runtime="llama_cpp", profile=pair.profile())
            return
        reference = self.reference[target.name]
        artifact = paired_artifact(self.artifacts[variant.name], Path(file) if file else None, draft, pair, self.variants_dir)
        main = self.measured[variant.name, target.name, "llama_cpp"]
        metrics = main.model_copy(update={"size_mb": artifact.size_bytes / 1e6, "decode_tok_s": pair.pair_tok_s, "profile": main.profile | pair.profile()})
        tags = {"byoai.draft_of": variant.name, "byoai.draft": draft, "byoai.server_flags": " ".join(artifact.facts["server_flags"])}
        progress.emit("registering", pair_variant.name, target.name, "llama_cpp")
        run_id = log_variant_run(self.parent, pair_variant, target, [artifact], metrics, reference, build, tags, {})
        log_serving(self.parent, run_id, measured.served, "")
        measured_here = Measured(target=target.name, runtime="llama_cpp", metrics=metrics, reference=reference, served=measured.served)
        card = model_card(self.recipe, pair_variant, [artifact], [measured_here], self.model)
        description = version_description(pair_variant, measured_here, build.key)
        version = register_variant(self.parent, self.recipe.name, self.recipe.sha(), pair_variant, target, artifact, run_id, build, card, description)
        tag_version(self.parent, self.recipe.name, version.version, tags)
        candidate = Candidate.measured(pair_variant.name, version.version, metrics, reference, measured.served)
        self.outcome.candidates.setdefault(target.name, []).append(candidate)
        note = f"{variant.name} with draft {draft}: {facts}, identical greedy output"
        self.outcome.results.append(ResultRow.measured(
            pair_variant.name, f"{variant.technique}+speculative", target.name, metrics, candidate.ppl_delta_pct, version.version, run_id, note,
            None, measured.served.flat() if measured.served else {},
        ))
        progress.emit("done", pair_variant.name, target.name, "llama_cpp", measured_line(metrics, candidate.ppl_delta_pct))


def paired_artifact(main, draft: Path | None, draft_name: str, pair, variants_dir: str):
    """The main model's folder with the draft beside it (draft.gguf) and the server flags that run
    them together (server-args.json, the draft named by its file name): what a pair ships as."""
    import json
    import os
    import shutil

    from byoai.files import atomic_folder, folder_sha256, json_sha256
    from byoai.tasks.build import Artifact
    from byoai.tasks.serving import draft_args

    flags = list(draft_args(Path("draft.gguf") if draft else None, pair.n_max, pair.p_min))
    folder = Path(variants_dir) / f"speculative-{json_sha256([main.sha, draft_name, flags, draft.stat().st_size if draft else 0])[:16]}"
    if not folder.is_dir():
        with atomic_folder(folder) as tmp:
            for item in Path(main.path).iterdir():
                if item.is_file() and not item.name.startswith("."):
                    os.link(item, tmp / item.name)
            if draft:
                shutil.copy2(draft, tmp / "draft.gguf")
            (tmp / "server-args.json").write_text(json.dumps({"args": flags}, indent=1))
    # what the server loads: the main file and the draft (an n-gram pair has none)
    size = main.size_bytes + (draft.stat().st_size if draft else 0)
    return Artifact(
        technique=f"{main.technique}+speculative", path=str(folder), sha=folder_sha256(folder), size_bytes=size,
        build_s=0.0, build_device="cpu", format="gguf", facts={
            **main.facts, "draft_of": main.technique, "draft": draft_name, "server_flags": flags,
            "acceptance": round(pair.acceptance, 4), "speedup": round(pair.speedup, 4),
        },
    )


def complete_cards(recipe: Recipe, parent: RunRef, outcome: TargetOutcome) -> None:
    """Once dispatched pools have reported: each card written in this run gets what every target,
    on every pool, measured of its artifact (a pool registers before it can see the others')."""
    order = [t.name for t in recipe.targets]
    for sha, card in outcome.cards.items():
        measured = {(m.target, m.runtime): m for m in outcome.measured.get(sha, [])}
        rows = sorted(measured.values(), key=lambda m: (order.index(m.target) if m.target in order else len(order), m.runtime))
        complete_card(parent, card.run_id, card.path, measured_section(recipe, rows))


def measure_targets(recipe: Recipe, targets: list[TargetProfile], parent: RunRef, outcome: TargetOutcome) -> None:
    """Resolve the model and data, measure the base model (the gate's reference) and every
    variant on `targets`, logging each into the parent MLflow run; rows land in `outcome` as they
    are recorded, so a caller that sees an exception still has what finished."""
    settings = Settings()
    model = resolve_model(recipe.model, str(settings.models_dir()))
    data_dir = str(settings.data_dir())
    # The plan, from the resolved model's config and what this worker has now: a variant that
    # cannot fit is skipped with the numbers before anything loads.
    shape = shape_of_folder(Path(model.path))
    memory = plan_memory(recipe, shape, targets, lambda target: capacity_here(), recipe.execution.max_workers)
    log_memory_plan(parent, memory)
    loop = Loop(
        recipe=recipe, targets=targets, parent=parent, model=model,
        # Calibration windows are prepared even when no technique calibrates: the build step
        # probes every artifact with a few of them to check its save/reload round trip.
        calibration=prepare_calibration(recipe.calibration, model, data_dir),
        perplexity_tokens=prepare_perplexity_tokens(recipe.evaluation.perplexity, model, data_dir),
        variants_dir=str(settings.variants_dir()),
        outcome=outcome,
        memory=memory,
    )
    measured = [t for t in targets if any(skip_reason(v, t) is None for v in recipe.variants)]
    # The gate's reference, measured on each target like every variant: the base model in
    # transformers, or its own-dtype GGUF in llama.cpp where transformers cannot hold it.
    builds, reference = {}, {}
    for t in measured:
        runtime = memory.reference_runtime.get(t.name)
        if runtime is None:
            continue
        stage = reference_variant(shape, runtime).stages[0]
        key = (stage.technique, repr(sorted(stage.params.items())))
        progress.stands_for(f"build-reference-{stage.technique}", "reference", t.name)
        progress.emit("waiting", "reference", t.name)
        if key not in builds:
            builds[key] = _heavy(build_variant, f"build-reference-{stage.technique}", "cpu").submit(
                stage.technique, stage.params, model, model, loop.calibration, "cpu", loop.variants_dir
            )
        reference[t.name] = loop.evaluate(builds[key], t, runtime, loop.runtime_build(t, runtime), "reference")
        loop.reference_builds[t.name] = builds[key], runtime
    loop.reference = {name: future.result() for name, future in reference.items()}
    for name, metrics in loop.reference.items():
        progress.emit("done", "reference", name, metrics.runtime, measured_line(metrics, 0.0))

    # An auto search measures the input file after its candidates, on its rungs (AutoSearch.run_input)
    inputs = loop.input_runs(measured)
    if inputs is not None and recipe.auto is None:
        loop.run_input(*inputs)
    searched = {v.name for v in recipe.auto_candidates()}
    loop.run_variants([v for v in recipe.variants if v.search is None and v.name not in searched])
    for variant in recipe.variants:
        if variant.search is not None:
            loop.run_search(variant)
    if recipe.auto is not None:
        search = AutoSearch(loop, recipe.auto)
        search.run(recipe.auto_candidates())
        if inputs is not None:
            search.run_input(*inputs)
    loop.run_speculative()
