"""An auto search inside a run (the recipe's `auto` section, what `byoai auto` writes).

Candidates one after another, in the recipe's order (byoai auto's: byoai.auto.choose): each is
built (cached, like every variant), measured on each rung's few windows in the runtime it ships
in (perplexity only; a `fastest` search first measures a short decode, which the pruner ranks
before any window is scored), and goes on to the next rung only while Optuna's pruner keeps it;
the survivors get the full protocol, a child run and a model version like any variant. A pruned
candidate keeps its child run (status pruned, tagged with its rung and the numbers it was dropped
on) and no version. The recipe's input GGUF, when there is one, comes after the candidates on the
same rungs and gets the full protocol only where it could match the best finalist
(AutoSearch.run_input).
Orchestration only: every number is computed in a task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from byoai import progress
from byoai.recipe import INPUT_VARIANT, AutoSpec, LatencySpec, TargetProfile, VariantSpec
from byoai.settings import Settings
from byoai.summary import ResultRow
from byoai.tasks.data import first_windows
from byoai.tasks.evaluate import ppl_delta_pct
from byoai.tasks.runtimes.protocol import window_perplexity
from byoai.tasks.search import FASTEST_RUNG_LATENCY, RungSearch
from byoai.tasks.tracking import log_unbuilt_run

if TYPE_CHECKING:
    from byoai.flows.measure import Loop

SEARCH_TAG = "auto"


def rung_windows(auto: AutoSpec, total: int) -> list[int]:
    """Each rung's window count, kept only where it measures more than the rung before and less
    than the full protocol (a short evaluation text may leave fewer rungs, or none)."""
    counts: list[int] = []
    for rung in auto.rungs:
        count = rung.windows_of(total)
        if count < total and (not counts or count > counts[-1]):
            counts.append(count)
    return counts


class AutoSearch:
    def __init__(self, loop: Loop, auto: AutoSpec):
        self.loop, self.auto = loop, auto
        self.searches = {t.name: RungSearch(auto, loop.recipe.promotion) for t in loop.targets}
        self.rungs = [first_windows(loop.perplexity_tokens, count, str(Settings().data_dir())) for count in rung_windows(auto, loop.perplexity_tokens.shape[0])]
        self.rung_references: dict[tuple[str, int], object] = {}
        # The search's own time: each candidate's build and evaluations as they recorded it (a
        # cached re-run replays the same seconds, so it makes the same decisions and reuses every
        # trial; a wall clock would let it go further). The reference does not count; the input file comes after the last candidate.
        self.spent_s, self.budget_s = 0.0, auto.time_budget_min * 60 if auto.time_budget_min else None
        # a fastest search ranks its rungs on a short decode first; the others on perplexity alone
        self.rung_latency = LatencySpec(**FASTEST_RUNG_LATENCY) if loop.recipe.promotion.objective == "fastest" else None

    def out_of_time(self, target: TargetProfile) -> bool:
        """Past the time budget, once a candidate on this target reached the final rung (so one can be promoted)."""
        return self.budget_s is not None and self.spent_s > self.budget_s and self.searches[target.name].finished > 0

    def reference_at(self, target: TargetProfile, rung: int):
        """The gate's reference on the rung's windows (a rung's ppl is compared like with like): its
        full evaluation's first windows, or measured on them where that evaluation has no
        per-window numbers (a result cached before they were kept)."""
        full, windows = self.loop.reference[target.name], self.rungs[rung].shape
        if len(full.window_nll) >= windows[0]:
            return full.model_copy(update={"ppl": window_perplexity(full.window_nll[: windows[0]], windows[1]), "ppl_tokens": windows[0] * windows[1]})
        if (target.name, rung) not in self.rung_references:
            artifact, runtime = self.loop.reference_builds[target.name]
            future = self.loop.evaluate(artifact, target, runtime, self.loop.runtime_build(target, runtime), "reference", (rung, self.rungs[rung], None))
            self.rung_references[target.name, rung] = future.result()
        return self.rung_references[target.name, rung]

    def run(self, candidates: list[VariantSpec]) -> None:
        for candidate in candidates:
            targets = []
            for target in self.loop.runnable(candidate):
                planned = self.loop.memory.of(candidate.name, target.name)
                no_room = self.searches[target.name].room_to_improve(candidate, planned.artifact / 1e6 if planned else None)
                if no_room:  # a reason of its own, whatever the time left
                    self.loop.skip_or_fail(candidate, target, "skipped", no_room)
                elif self.out_of_time(target):
                    self.loop.skip_or_fail(candidate, target, "skipped", f"auto.time_budget_min ({self.auto.time_budget_min:g} min) reached before this candidate")
                else:
                    targets.append(target)
            if targets:
                self.search(candidate, targets)

    def search(self, candidate: VariantSpec, targets: list[TargetProfile]) -> None:
        built = self.loop.built_chain(candidate, targets, self.loop.submit_chain(candidate, targets))
        if built is None:
            return
        self.spent_s += sum(artifact.build_s for artifact in built)
        alive = [(t, runtime, build) for t in targets for runtime, build in self.loop.measurable(candidate, t, built[-1].format)]
        trials = {(t.name, runtime): self.searches[t.name].start(candidate.name) for t, runtime, _ in alive}

        def decide(rung: int, target: TargetProfile, runtime: str, metrics, delta: float | None) -> str | None:
            search, trial = self.searches[target.name], trials[target.name, runtime]
            search.measured(candidate)
            if delta is None:  # decode speed alone, before any window is scored
                why = search.rank(trial, rung, search.value(metrics))
            elif self.rung_latency is not None:  # ranked on speed already: the gate and budget are left
                why = search.report_after_rank(trial, rung, delta, metrics)
            else:
                why = search.report(trial, rung, delta, metrics)
            if why is not None:
                self.record_pruned(candidate, target, runtime, rung, metrics, delta, why)
            return why

        def fail(target: TargetProfile, runtime: str, message: str, text: str) -> None:
            self.loop.skip_or_fail(candidate, target, "failed", message, text, runtime)
            self.searches[target.name].finish(trials[target.name, runtime], None)

        alive, scored = self.climb(candidate.name, built[-1], alive, decide, fail)
        if not alive:
            return
        evaluations = [(candidate, t, runtime, built, self.loop.evaluate_candidate(built[-1], t, runtime, build, candidate.name, scored.get((t.name, runtime), ())))
                       for t, runtime, build in alive]
        note = f"auto: kept through {len(self.rungs)} rung(s)"
        recorded = self.loop.record_variant(candidate, evaluations, {"byoai.search": SEARCH_TAG, "byoai.rung": "final"}, note)
        self.spent_s += sum(future.result().profile.get("evaluate_s", 0.0) for *_, future in evaluations if not future.state.is_failed())
        for (_, target, runtime, *_), result in zip(evaluations, recorded, strict=True):
            self.searches[target.name].finish(trials[target.name, runtime], result)

    def run_input(self, artifact, runs: list[tuple[TargetProfile, str, Any]]) -> None:
        """The recipe's input GGUF, after the candidates and on the same rungs: it is not a
        candidate (never registered) and matters only if the champion does not beat it, so it
        gets the full protocol (and the run's verdict on it, as in any run) only where its rung
        numbers pass the gate and the budgets and match or beat the best finalist's on every
        rung, or where no candidate reached the final rung. Elsewhere its row says on which rung
        and number it lost."""

        def decide(rung: int, target: TargetProfile, runtime: str, metrics, delta: float | None) -> str | None:
            search = self.searches[target.name]
            why = None if delta is None else search.fails(delta, metrics)
            if why is None and (delta is None or self.rung_latency is None):  # the objective's number, once per rung
                why = search.input_loses(rung, search.value(metrics))
            if why is not None:
                self.record_pruned(INPUT_VARIANT, target, runtime, rung, metrics, delta, f"the input file (not a candidate): {why}")
            return why

        def fail(target: TargetProfile, runtime: str, message: str, text: str) -> None:
            self.loop.skip_or_fail(INPUT_VARIANT, target, "failed", message, text, runtime)

        runs, scored = self.climb(INPUT_VARIANT.name, artifact, runs, decide, fail)
        if runs:
            self.loop.run_input(artifact, runs, scored)

    def climb(self, name: str, artifact, runs: list, decide, fail) -> tuple[list, dict[tuple[str, str], tuple[float, ...]]]:
        """Every rung in turn (measure_rung): the runs left after the last, and for each
        (target name, runtime) the last rung's window NLLs, which the full protocol reuses."""
        scored: dict[tuple[str, str], tuple[float, ...]] = {}
        for rung in range(len(self.rungs)):
            measured = self.measure_rung(name, artifact, runs, rung, decide, fail)
            runs, scored = [run for run, _ in measured], {(t.name, runtime): m.window_nll for (t, runtime, _), m in measured}
        return runs, scored

    def measure_rung(self, name: str, artifact, runs: list, rung: int, decide, fail) -> list:
        """One rung for `name` on each live (target, runtime, runtime build) of `runs`: for a
        `fastest` search a short decode first, which `decide` ranks before any window is scored,
        then perplexity on the rung's windows for what is left. `decide(rung, target, runtime,
        metrics, ppl delta or None on speed alone)` says why a run is dropped (and records it), or
        None; `fail(target, runtime, message, text)` records a failed evaluation. The runs left,
        each with its numbers on the rung."""
        speeds = {}
        if self.rung_latency is not None:
            measured = self.evaluations(name, artifact, runs, rung, self.rung_latency, fail)
            speeds = {(t.name, runtime): m for t, runtime, _, m in measured if decide(rung, t, runtime, m, None) is None}
            runs = [(t, runtime, build) for t, runtime, build in runs if (t.name, runtime) in speeds]
        alive = []
        for target, runtime, build, metrics in self.evaluations(name, artifact, runs, rung, None, fail):
            if (speed := speeds.get((target.name, runtime))) is not None:
                metrics = metrics.model_copy(update={"decode_tok_s": speed.decode_tok_s, "prefill_ms": speed.prefill_ms, "profile": metrics.profile | speed.profile})
            if decide(rung, target, runtime, metrics, ppl_delta_pct(metrics, self.reference_at(target, rung))) is None:
                alive.append(((target, runtime, build), metrics))
        return alive

    def evaluations(self, name: str, artifact, runs: list, rung: int, latency: LatencySpec | None, fail) -> list:
        """(target, runtime, build, metrics) of each run's rung evaluation, submitted together: of
        decode speed with a latency profile, of perplexity on the rung's windows without."""
        from byoai.flows.measure import error_text

        futures = [(t, runtime, build, self.loop.evaluate(artifact, t, runtime, build, name, (rung, self.rungs[rung], latency))) for t, runtime, build in runs]
        out = []
        for target, runtime, build, future in futures:
            if future.wait() or future.state.is_failed():
                message, text = error_text(future.state)
                fail(target, runtime, f"rung {rung} evaluation failed: {message}", text)
                continue
            metrics = future.result()
            self.spent_s += metrics.profile.get("evaluate_s", 0.0)
            out.append((target, runtime, build, metrics))
        return out

    def record_pruned(self, candidate: VariantSpec, target: TargetProfile, runtime: str, rung: int, metrics, delta: float | None, why: str) -> None:
        """A pruned candidate (or input file): its child run with the rung's numbers, a row that
        says where and why, no version. `delta` None: dropped on decode speed, no window scored."""
        windows = self.rungs[rung].shape[0]
        numbers = [f"{metrics.size_mb:.1f} MB"] + ([f"{metrics.decode_tok_s:.1f} tok/s"] if metrics.decode_tok_s else [])
        values = {"size_mb": metrics.size_mb, "rung": rung} | ({"decode_tok_s": metrics.decode_tok_s} if metrics.decode_tok_s else {})
        if delta is None:
            where = f"pruned at rung {rung} on decode speed, before its windows"
        else:
            where = f"pruned at rung {rung} ({windows} window{'s' * (windows > 1)})"
            numbers.insert(0, f"ppl {metrics.ppl:.3f} ({delta:+.1f} %)")
            values |= {"ppl": metrics.ppl, "ppl_delta_pct": delta, "rung_windows": windows}
        reason = f"{where}: {why}; {', '.join(numbers)}"
        run_id = log_unbuilt_run(
            self.loop.parent, candidate, target, "pruned", reason, runtime=runtime,
            tags={"byoai.search": SEARCH_TAG, "byoai.rung": str(rung), "byoai.pruned": "true"}, metrics=values,
        )
        progress.emit("pruned", candidate.name, target.name, runtime, reason)
        self.loop.outcome.results.append(ResultRow(
            variant=candidate.name, technique=candidate.technique, target=target.name, runtime=runtime, status="pruned",
            ppl=None if delta is None else metrics.ppl, ppl_delta_pct=delta, size_mb=metrics.size_mb, decode_tok_s=metrics.decode_tok_s or None,
            run_id=run_id, reason=reason,
        ))
