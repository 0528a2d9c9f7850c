"""Parameter search for a variant with Optuna: propose, score, decide when to stop.

The flow runs each proposal as an ordinary variant (cached build and evaluation, child run,
model version), so a re-run of the same search replays the same seeded proposals from cache.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from byoai.recipe import PromotionSpec, RangeSpec, SearchSpec
from byoai.tasks.promote import Candidate, rejection

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
