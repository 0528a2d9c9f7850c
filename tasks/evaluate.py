"""evaluate_artifact: reload a saved artifact from disk on the target device and measure it.

Every number comes from the reloaded folder, never from the in-memory model that built it:
that is what a user will download, and some formats change on a save/reload round trip.
"""

from __future__ import annotations

import math
import statistics
import time
from functools import cache
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict

from byoai.log import step_logger
from byoai import devices
from byoai.recipe import LatencySpec, TargetProfile
from tasks.lm_eval_tasks import LmEvalSpec
from tasks.build import Artifact
from tasks.data import CACHED, TokensRef, load_tokens


class Metrics(BaseModel):
    model_config = ConfigDict(frozen=True)

    ppl: float
    ppl_tokens: int
    size_mb: float
    load_s: float
    prefill_ms: float
    decode_tok_s: float
    device: str
    # The performance profile, flat names -> values (logged as MLflow metrics as they are):
    # ttft_ms.pN (+ .min/.max) per prompt length N, decode_tok_s.bB and tpot_ms.bB per batch B,
    # peak_mem_mb, weights_mb, bandwidth_gb_s, decode_bound_tok_s, decode_efficiency.
    profile: dict[str, float] = {}
    # lm-eval scores per task (tasks.lm_eval_tasks.run_lm_eval), when the recipe asks for them.
    tasks: dict[str, dict] = {}


def ppl_delta_pct(metrics: Metrics, reference: Metrics) -> float:
    """Relative perplexity increase over the reference (the base model on the same target)."""
    return (metrics.ppl - reference.ppl) / reference.ppl * 100


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def load_artifact(path: str, target: TargetProfile):
    """Load the folder as the target will; return the model and the wall time it took."""
    import torch

    from tasks.techniques.io import load_model

    started = time.perf_counter()
    # device_map places weights at load: quantized (e.g. bitsandbytes) models refuse a later .to()
    model, _ = load_model(Path(path), dtype=getattr(torch, target.dtype), device_map=target.device)
    _sync(target.device)
    return model, time.perf_counter() - started


def measure_perplexity(model, windows, device: str) -> float:
    """GPTQ-paper protocol: exp(mean NLL) over non-overlapping windows [n, seq_len] of one text."""
    import torch

    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for row in windows:
            ids = row[None].to(device)
            logits = model(ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total_nll += nll.item()
            total_tokens += ids.shape[1] - 1
    return math.exp(total_nll / total_tokens)


def _timed(fn, device: str) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def _spread(samples: list[float]) -> tuple[float, float, float]:
    return statistics.median(samples), min(samples), max(samples)


def measure_latency(model, windows, spec: LatencySpec, device: str) -> tuple[float, float, dict[str, float]]:
    """Prefill latency (TTFT) per prompt length and greedy decode speed per batch size.

    Warm-ups first, then `repeats` measurements; medians are reported with min and max. Returns
    (TTFT ms at prompt_tokens, batch-1 decode tok/s, the full profile).
    """
    import torch

    tokens = windows.flatten()
    profile: dict[str, float] = {}

    def prefill(ids):
        return model(ids, use_cache=True)

    def decode(out, steps: int):
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    with torch.inference_mode():
        for length in sorted({spec.prompt_tokens, *spec.prompt_lengths}):
            ids = tokens[:length][None].to(device)
            samples = [_timed(lambda: prefill(ids), device) * 1000 for _ in range(spec.warmup + spec.repeats)][spec.warmup:]
            profile[f"ttft_ms.p{length}"], profile[f"ttft_ms.p{length}.min"], profile[f"ttft_ms.p{length}.max"] = _spread(samples)
        for batch in sorted({1, *spec.batch_sizes}):
            # distinct prompts per row, as concurrent requests would be
            ids = torch.stack([tokens[i * 7 : i * 7 + spec.prompt_tokens] for i in range(batch)]).to(device)
            speeds = []
            for attempt in range(spec.warmup + spec.repeats):
                out = prefill(ids)
                seconds = _timed(lambda: decode(out, spec.new_tokens), device)
                if attempt >= spec.warmup:
                    speeds.append(batch * spec.new_tokens / seconds)
            median, low, high = _spread(speeds)
            profile[f"decode_tok_s.b{batch}"], profile[f"decode_tok_s.b{batch}.min"], profile[f"decode_tok_s.b{batch}.max"] = median, low, high
            profile[f"tpot_ms.b{batch}"] = batch * 1000 / median
    return profile[f"ttft_ms.p{spec.prompt_tokens}"], profile["decode_tok_s.b1"], profile


@cache
def memory_bandwidth_gb_s(device: str) -> float:
    """Measured copy bandwidth (read + write) of a 256 MB buffer: the ceiling for decode."""
    import torch

    source = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    seconds = min(_timed(lambda: target.copy_(source), device) for _ in range(5))
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def memory_profile(model, device: str) -> dict[str, float]:
    """Weights in memory, peak memory, and the bandwidth bound on batch-1 decode speed.

    Batch-1 decode reads every weight once per token, so tokens/s <= bandwidth / weight bytes.
    """
    import psutil
    import torch

    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = psutil.Process().memory_info().rss
    bandwidth = memory_bandwidth_gb_s(device)
    return {
        "weights_mb": weights / 1e6,
        "peak_mem_mb": peak / 1e6,
        "bandwidth_gb_s": bandwidth,
        "decode_bound_tok_s": bandwidth * 1e9 / weights,
    }


# log_prints off: dill (datasets' fingerprinting, under lm-eval) disassembles functions with
# print() inside a stdout capture; the flow's log_prints would turn every line into a log record.
@task(cache_policy=CACHED, persist_result=True, log_prints=False)
def evaluate_artifact(
    artifact: Artifact,
    target: TargetProfile,
    perplexity_tokens: TokensRef,
    latency: LatencySpec,
    lm_eval: LmEvalSpec | None = None,
    lm_eval_data: str | None = None,  # fingerprint of the task files: edited data invalidate the cache
) -> Metrics:
    import torch
    from transformers import AutoTokenizer

    from tasks.lm_eval_tasks import run_lm_eval

    if target.threads:
        torch.set_num_threads(target.threads)
    if not Path(artifact.path).is_dir():
        raise FileNotFoundError(f"artifact folder {artifact.path} is gone; delete .byoai/prefect-results to rebuild")
    if target.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, load_s = load_artifact(artifact.path, target)
    windows = load_tokens(perplexity_tokens)
    ppl = measure_perplexity(model, windows, target.device)
    prefill_ms, decode_tok_s, profile = measure_latency(model, windows, latency, target.device)
    profile |= memory_profile(model, target.device)
    profile["decode_efficiency"] = decode_tok_s / profile["decode_bound_tok_s"]
    scores = run_lm_eval(model, AutoTokenizer.from_pretrained(artifact.path), lm_eval) if lm_eval else {}
    metrics = Metrics(
        ppl=ppl,
        ppl_tokens=int(windows.numel()),
        size_mb=artifact.size_bytes / 1e6,
        load_s=load_s,
        prefill_ms=prefill_ms,
        decode_tok_s=decode_tok_s,
        device=devices.describe(target.device),
        profile=profile,
        tasks=scores,
    )
    step_logger().info("%s on %s: %s", artifact.technique, target.name, metrics)
    return metrics
