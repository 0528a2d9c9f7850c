"""What a flow run returns and the CLI prints: one row per variant x target, and the decisions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ResultRow(BaseModel):
    variant: str
    technique: str
    target: str
    status: Literal["finished", "failed", "skipped"]
    ppl: float | None = None
    ppl_delta_pct: float | None = None
    size_mb: float | None = None
    load_s: float | None = None
    prefill_ms: float | None = None
    decode_tok_s: float | None = None
    # lm-eval task -> main metric of this variant (e.g. accuracy)
    task_scores: dict[str, float] = {}
    # the performance profile (tasks.evaluate.Metrics.profile) and the device it was measured on
    profile: dict[str, float] = {}
    device: str = ""
    version: str | None = None
    run_id: str | None = None
    reason: str = ""


class RunSummary(BaseModel):
    model_name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    results: list[ResultRow]
    decisions: list[dict[str, Any]]
    # target -> version of champion-<target> after this run (None: no champion)
    champions: dict[str, str | None]
