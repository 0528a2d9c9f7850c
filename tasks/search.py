"""Parameter search for a variant with Optuna: propose, score, decide when to stop.

The flow runs each proposal as an ordinary variant (cached build and evaluation, child run,
model version), so a re-run of the same search replays the same seeded proposals from cache.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

from byoai.recipe import PromotionSpec, RangeSpec, SearchSpec, VariantSpec
from byoai.tasks.promote import Candidate, objective_key, rejection

WORST = 1e30
_METRIC_OF_OBJECTIVE = {"smallest": "size_mb", "fastest": "decode_tok_s", "best_quality": "ppl"}


class Search:
    """One variant's search: an Optuna study asked for trials and told their scores."""

    def __init__(self, spec: SearchSpec, promotion: PromotionSpec):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.spec, self.promotion = spec, promotion
        self.metric = spec.metric or _METRIC_OF_OBJECTIVE[promotion.objective]
        categorical = all(isinstance(choices, list) for choices in spec.space.values())
        # Seeded TPE (re-runs replay its proposals). A finite grid is enqueued whole, in a seeded
        # order, and so walked without repeats: Optuna's BruteForceSampler and GridSampler call
        # study.stop() once the grid is exhausted, which raises outside study.optimize() (this
        # ask-and-tell loop).
        self.study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=spec.seed))
        self.grid_size, self.asked = None, 0
        if categorical:
            grid = [dict(zip(spec.space, combo, strict=True)) for combo in itertools.product(*spec.space.values())]
            random.Random(spec.seed).shuffle(grid)
            for params in grid:
                self.study.enqueue_trial(params)
            self.grid_size = len(grid)
        self.best: float | None = None

    def ask(self) -> tuple[Any, dict[str, Any]] | None:
        """The next trial and its parameters, or None when the grid is exhausted."""
        if self.grid_size is not None and self.asked >= self.grid_size:
            return None
        self.asked += 1
        trial = self.study.ask()
        params = {}
        for name, choices in self.spec.space.items():
            if isinstance(choices, RangeSpec):
                if choices.step is not None and float(choices.step).is_integer():
                    params[name] = trial.suggest_int(name, int(choices.low), int(choices.high), step=int(choices.step), log=choices.log)
                else:
                    params[name] = trial.suggest_float(name, choices.low, choices.high, step=choices.step, log=choices.log)
            else:
                params[name] = trial.suggest_categorical(name, choices)
        return trial, params

    def score(self, candidate: Candidate | None) -> float:
        """Lower is better; a failed trial or one outside the gate and budgets scores worst."""
        if candidate is None or rejection(candidate, self.promotion) is not None:
            return math.inf
        value = getattr(candidate, self.metric)
        return -value if self.metric == "decode_tok_s" else value

    def tell(self, trial, candidate: Candidate | None) -> bool:
        """Record a trial's result; True when the search should stop (its goal is reached)."""
        score = self.score(candidate)
        # A worst finite score keeps the trial "explored" (a grid does not propose it again).
        self.study.tell(trial, WORST if math.isinf(score) else score)
        if math.isinf(score):
            return False
        self.best = score if self.best is None else min(self.best, score)
        if self.spec.stop_at is None:
            return False
        goal = -self.spec.stop_at if self.metric == "decode_tok_s" else self.spec.stop_at
        return score <= goal


# How much smaller a file may be and still be better (RungSearch.room_to_improve).
ROOM_BETTER = 0.85

# What a rung of a `fastest` search adds to its perplexity: one short batch-1 decode.
FASTEST_RUNG_LATENCY = {"prompt_tokens": 32, "new_tokens": 16, "warmup": 1, "repeats": 1}


def gguf_types(candidate: VariantSpec) -> tuple[str, bool] | None:
    """A GGUF candidate's file layout (its stages, the last one's imatrix flag left out) and
    whether it quantizes with an importance matrix; None for a candidate that writes no GGUF.
    Two candidates with one layout write files of the same types and size, so they decode at the
    same speed; the importance matrix only changes how each type's values are chosen."""
    last = candidate.stages[-1]
    if last.technique != "gguf":
        return None
    params = dict(last.params)
    imatrix = bool(params.pop("imatrix", False))
    stages = [stage.model_dump(mode="json") for stage in candidate.stages[:-1]] + [{"technique": "gguf", "params": params}]
    return json.dumps(stages, sort_keys=True), imatrix


class RungSearch:
    """byoai auto's search on one target: an Optuna study whose own pruner (successive halving or
    Hyperband) decides after each low-fidelity rung which candidates go on to the next.

    A candidate reports one value per rung, at Optuna step reduction_factor**rung (the steps at
    which successive halving's rungs sit with min_resource 1). The value is the promotion
    objective's own measure, lower is better: size for smallest, perplexity for best_quality,
    minus decode speed for fastest. A candidate whose rung numbers already fail the gate or the
    size budget ends there (its size is exact at every rung; its perplexity is measured on the
    rung's windows against the reference on the same windows); the pruner ranks the rest. A
    `fastest` rung measures a short decode first (FASTEST_RUNG_LATENCY) and lets the pruner rank
    it, and scores perplexity only for what the pruner keeps: a file it drops on speed is dropped
    whatever its perplexity.
    """

    def __init__(self, auto, promotion: PromotionSpec):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.promotion, self.factor, self.rungs = promotion, auto.reduction_factor, len(auto.rungs)
        if auto.pruner == "hyperband":
            pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=self.factor ** self.rungs, reduction_factor=self.factor)
        else:
            pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=self.factor, min_early_stopping_rate=0)
        self.study = optuna.create_study(direction="minimize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
        self.finished = 0  # candidates that reached the final rung
        self.best: Candidate | None = None  # the best of them that passes the gate and budgets
        self.with_imatrix: dict[str, str] = {}  # GGUF layouts measured with an importance matrix -> that candidate
        self.kept_values: dict[str, dict[int, float]] = {}  # candidate -> rung -> the value the pruner kept it on

    def measured(self, candidate: VariantSpec) -> None:
        """The candidate has numbers on this target (a rung or more, pruned or not)."""
        if (types := gguf_types(candidate)) is not None and types[1]:
            self.with_imatrix.setdefault(types[0], candidate.name)

    def room_to_improve(self, candidate: VariantSpec, estimated_mb: float | None) -> str | None:
        """Why this candidate of this estimated size cannot beat what was measured (it is not built), or None.

        A GGUF without an importance matrix whose twin with one was measured: the same types, so
        the same size and speed, and the importance matrix makes them at least as accurate (on
        SmolLM2 × WikiText-2 the plain q4_k_m, q3_k_m and q2_k are +1.2, +1.7 and +15.2 points
        of perplexity behind their imatrix twins: docs/auto.md), whichever the objective.
        Then on size alone, as GGUF files behave: smallest needs a smaller file; best_quality one
        at least ROOM_BETTER as large (a type much smaller than the best one loses quality). Speed
        does not follow size closely enough to skip on it (on a 2-core CPU SmolLM2's q8_0 decodes
        faster than its q4_k_m): fastest skips nothing on size."""
        if (types := gguf_types(candidate)) is not None and not types[1] and types[0] in self.with_imatrix:
            twin = self.with_imatrix[types[0]]
            return f"no room to improve: the same types as {twin} (same size and speed), measured first, which its importance matrix makes at least as accurate"
        best = self.best
        if best is None or estimated_mb is None:
            return None
        objective = self.promotion.objective
        if objective == "smallest" and estimated_mb >= best.size_mb:
            return f"no room to improve: ~{estimated_mb:.0f} MB estimated, {best.variant} already passes at {best.size_mb:.1f} MB"
        if objective == "best_quality" and estimated_mb < best.size_mb * ROOM_BETTER:
            return f"no room to improve: ~{estimated_mb:.0f} MB estimated, under {ROOM_BETTER:g} x {best.variant}'s {best.size_mb:.1f} MB (ppl {best.ppl:.3f})"
        return None

    def start(self, candidate: str):
        trial = self.study.ask()
        trial.set_user_attr("candidate", candidate)
        return trial

    def value(self, metrics) -> float:
        """The objective's own measure of a rung's numbers (tasks.evaluate.Metrics), lower is better."""
        return {"smallest": metrics.size_mb, "best_quality": metrics.ppl, "fastest": -metrics.decode_tok_s}[self.promotion.objective]

    def fails(self, ppl_delta_pct: float, metrics) -> str | None:
        """Why a rung's numbers already fail the gate or the size budget, or None."""
        limit, budget = self.promotion.gate.max_ppl_increase_pct, self.promotion.max_size_mb
        if ppl_delta_pct > limit:
            return f"fails the gate on these windows (+{ppl_delta_pct:.1f} % > {limit:g} %)"
        if budget is not None and metrics.size_mb > budget:
            return f"over budget ({metrics.size_mb:.1f} MB > max_size_mb {budget:g})"
        return None

    def report(self, trial, rung: int, ppl_delta_pct: float, metrics) -> str | None:
        """Report a rung's numbers (tasks.evaluate.Metrics); why the candidate is dropped here (it is
        told so), or None."""
        import optuna

        why = self.fails(ppl_delta_pct, metrics)
        if why is None:
            return self.rank(trial, rung, self.value(metrics))
        trial.report(WORST, step=self.factor**rung)
        self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return why

    def rank(self, trial, rung: int, value: float) -> str | None:
        """Report the rung's value alone and let the pruner rank it: why it is dropped (it is told
        so), or None. A `fastest` search ranks decode speed before it measures perplexity
        (`report_after_rank` then checks the gate): a candidate the pruner drops on speed is never
        scored on the rung's windows."""
        import optuna

        trial.report(value, step=self.factor**rung)
        if trial.should_prune():
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return f"ranked out by {'Hyperband' if isinstance(self.study.pruner, optuna.pruners.HyperbandPruner) else 'successive halving'}"
        self.kept_values.setdefault(trial.user_attrs["candidate"], {})[rung] = value
        return None

    def report_after_rank(self, trial, rung: int, ppl_delta_pct: float, metrics) -> str | None:
        """A ranked candidate's perplexity on the rung: why it fails the gate or a budget (its rung
        values are forgotten, as for a full-protocol failure, and it is told so), or None."""
        import optuna

        why = self.fails(ppl_delta_pct, metrics)
        if why is not None:
            self.forget_rungs(trial)
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return why

    def input_loses(self, rung: int, value: float) -> str | None:
        """Why the recipe's input file, measured on a rung after the search, cannot match the best
        finalist (its value there is worse than the finalist's on the same rung), or None: it then
        gets the full protocol, and the run's verdict on it, as in any run. A tie goes on: the
        champion may then be no better than the input (a mixed GGUF at the input's size can
        choose the input's own types), which the verdict must be able to say."""
        best = self.best
        if best is None or rung not in self.kept_values.get(best.variant, {}):
            return None
        theirs = self.kept_values[best.variant][rung]
        if value <= theirs:
            return None
        measure = {"smallest": "MB", "best_quality": "ppl", "fastest": "tok/s"}[self.promotion.objective]
        sign = -1 if self.promotion.objective == "fastest" else 1
        return f"is worse than {best.variant} on this rung ({sign * value:.3f} {measure} against {sign * theirs:.3f})"

    def forget_rungs(self, trial) -> None:
        """A candidate that passed its rungs but fails the gate or a budget on the full protocol:
        its rung values become the worst, so they rank no later candidate out. Optuna's
        successive halving compares a rung value with every trial's value at that rung, whatever
        became of that trial (session 12: a q4_0 at +6 % on two windows and +12.5 % in full kept
        q3_k_m-imatrix, +4.6 % in full, from the final rung, and `smallest` ended with no
        champion). Optuna has no public call for it: its storage holds the rung values as the
        trial's `completed_rung_<n>` system attributes, which its pruners read."""
        storage = self.study._storage
        for key in storage.get_trial(trial._trial_id).system_attrs:
            if key.startswith("completed_rung_"):
                storage.set_trial_system_attr(trial._trial_id, key, WORST)

    def finish(self, trial, candidate: Candidate | None) -> None:
        """The candidate's full measurement (None: it failed); scored like a search trial."""
        import optuna

        if candidate is None:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        self.finished += 1
        if rejection(candidate, self.promotion) is not None:
            self.forget_rungs(trial)
            self.study.tell(trial, WORST)
            return
        if self.best is None or objective_key(self.promotion)(candidate) < objective_key(self.promotion)(self.best):
            self.best = candidate
        metric = _METRIC_OF_OBJECTIVE[self.promotion.objective]
        value = getattr(candidate, metric)
        self.study.tell(trial, -value if metric == "decode_tok_s" else value)
