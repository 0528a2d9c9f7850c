"""What a flow run returns and the CLI prints: one row per variant x target, and the decisions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ResultRow(BaseModel):
    variant: str
    technique: str
    target: str
    status: Literal["finished", "failed", "skipped", "pruned"]
    # the runtime it was measured in (transformers, llama_cpp, ...) and which build of it
    runtime: str = ""
    runtime_build: str = ""
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
    # a technique's own prediction of its loss (gguf_mixed: summed per-tensor KL), beside the measured ppl
    predicted_loss: float | None = None
    # served to concurrent users (tasks.serving.ServingMetrics.flat): serving.u<N>.<metric>
    serving: dict[str, float] = {}

    @classmethod
    def measured(
        cls, variant: str, technique: str, target: str, metrics, ppl_delta_pct: float, version: str | None, run_id: str,
        note: str = "", predicted_loss: float | None = None, serving: dict[str, float] | None = None,
    ) -> ResultRow:
        """The row of a finished measurement (tasks.evaluate.Metrics)."""
        return cls(
            variant=variant, technique=technique, target=target, status="finished", runtime=metrics.runtime,
            runtime_build=metrics.runtime_build, ppl=metrics.ppl, ppl_delta_pct=ppl_delta_pct, size_mb=metrics.size_mb,
            load_s=metrics.load_s, prefill_ms=metrics.prefill_ms, decode_tok_s=metrics.decode_tok_s,
            task_scores={task: score["value"] for task, score in metrics.tasks.items()},
            profile=metrics.profile, device=metrics.device, version=version, run_id=run_id, reason=note,
            predicted_loss=predicted_loss, serving=serving or {},
        )


class RunSummary(BaseModel):
    model_name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    results: list[ResultRow]
    decisions: list[dict[str, Any]]
    # target -> version of champion-<target> after this run (None: no champion)
    champions: dict[str, str | None]
