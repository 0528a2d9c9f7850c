"""evaluate_in_runtime: load a saved artifact in one of its target's runtimes and measure it.

Every number comes from the artifact on disk, never from the in-memory model that built it: that
is what a user will download, and some formats change on a save/reload round trip. Every runtime
measures in a worker process of its own (byoai.worker, byoai.isolation): the model and its buffers
never accumulate in the flow's process, an out-of-memory kill fails this evaluation alone, and two
builds of one compiled runtime can be measured in one flow run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict

from byoai import progress
from byoai.log import step_logger
from byoai.recipe import LatencySpec, TargetProfile
from byoai.tasks.build import Artifact
from byoai.tasks.data import CACHED, TokensRef
from byoai.tasks.lm_eval_tasks import LmEvalSpec
from byoai.tasks.runtimes import RUNTIMES, Measured, MeasureRequest, RuntimeBuild


class Metrics(BaseModel):
    model_config = ConfigDict(frozen=True)

    ppl: float
    ppl_tokens: int
    # each window's summed NLL, in order: an auto search's rungs (the first windows) read the
    # reference's from its full evaluation instead of measuring them again
    window_nll: tuple[float, ...] = ()
    size_mb: float
    load_s: float
    prefill_ms: float
    decode_tok_s: float
    device: str
    # The runtime that ran the artifact, and which build of it (e.g. llama.cpp compiled native).
    runtime: str = "transformers"
    runtime_build: str = ""
    # The performance profile, flat names -> values (logged as MLflow metrics as they are):
    # ttft_ms.pN (+ .min/.max) per prompt length N, decode_tok_s.bB and tpot_ms.bB per batch B,
    # peak_mem_mb, weights_mb, bandwidth_gb_s, decode_bound_tok_s, decode_efficiency.
    profile: dict[str, float] = {}
    # lm-eval scores per task (tasks.lm_eval_tasks.score_lm), when the recipe asks for them.
    tasks: dict[str, dict] = {}


def ppl_delta_pct(metrics: Metrics, reference: Metrics) -> float:
    """Relative perplexity increase over the reference (the base model on the same target)."""
    return (metrics.ppl - reference.ppl) / reference.ppl * 100


def measure_isolated(request: MeasureRequest, env: dict[str, str]) -> Measured:
    """Run the protocol in a worker process (byoai.worker); its output goes to the log."""
    from byoai.isolation import run_worker

    measured, _, output = run_worker("measure", request.model_dump_json(), env)
    if output.strip():
        step_logger().debug("%s worker output:\n%s", request.runtime, output[-10000:])
    return measured


@task(cache_policy=CACHED, persist_result=True)
def evaluate_in_runtime(
    artifact: Artifact,
    target: TargetProfile,
    runtime: str,
    build: RuntimeBuild,
    perplexity_tokens: TokensRef,
    latency: LatencySpec,
    lm_eval: LmEvalSpec | None = None,
    lm_eval_data: str | None = None,  # fingerprint of the task files: edited data invalidate the cache
    parts: str = "all",  # "perplexity" or "speed": an auto search's rung (tasks.runtimes.protocol.measure)
    known_nll: tuple[float, ...] = (),  # the first windows' NLLs from an auto search's last rung: not scored again
) -> Metrics:
    if not Path(artifact.path).exists():
        raise FileNotFoundError(f"artifact {artifact.path} is gone; delete .byoai/prefect-results to rebuild")
    request = MeasureRequest(
        runtime=runtime, artifact_path=artifact.path, artifact_format=artifact.format, device=target.device,
        dtype=target.dtype, threads=target.threads, build=build, windows_path=perplexity_tokens.path,
        latency=latency.model_dump(mode="json"), lm_eval=lm_eval.model_dump(mode="json") if lm_eval else None,
        parts=parts, known_nll=known_nll,
    )
    import time

    progress.from_task("evaluating")
    started = time.perf_counter()
    measured = measure_isolated(request, RUNTIMES[runtime].worker_env(build))
    values = measured.model_dump()
    values["profile"] = values["profile"] | {"evaluate_s": round(time.perf_counter() - started, 2)}
    metrics = Metrics(**values, size_mb=artifact.size_bytes / 1e6, runtime=runtime, runtime_build=build.key)
    measured_parts = {"all": f"ppl {metrics.ppl:.3f}, decode {metrics.decode_tok_s:.1f} tok/s", "perplexity": f"ppl {metrics.ppl:.3f}",
                      "speed": f"decode {metrics.decode_tok_s:.1f} tok/s"}[parts]
    step_logger().info("%s on %s in %s: %s", artifact.technique, target.name, runtime, measured_parts)
    return metrics
