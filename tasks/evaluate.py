"""evaluate_artifact: reload a saved artifact from disk on the target device and measure it.

Every number comes from the reloaded folder, never from the in-memory model that built it:
that is what a user will download, and some formats change on a save/reload round trip.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict

from byoai.log import step_logger
from byoai import devices
from byoai.recipe import LatencySpec, TargetProfile
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


def measure_latency(model, prompt, spec: LatencySpec, device: str) -> tuple[float, float]:
    """Batch-1 prefill latency (ms) and greedy decode throughput (tokens/s), medians of repeats."""
    import torch

    ids = prompt[None].to(device)
    prefill, decode = [], []
    with torch.inference_mode():
        for attempt in range(spec.warmup + spec.repeats):
            _sync(device)
            started = time.perf_counter()
            out = model(ids, use_cache=True)
            _sync(device)
            prefill_s = time.perf_counter() - started
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            started = time.perf_counter()
            for _ in range(spec.new_tokens):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            if attempt >= spec.warmup:
                prefill.append(prefill_s)
                decode.append(spec.new_tokens / (time.perf_counter() - started))
    return statistics.median(prefill) * 1000, statistics.median(decode)


@task(cache_policy=CACHED, persist_result=True)
def evaluate_artifact(artifact: Artifact, target: TargetProfile, perplexity_tokens: TokensRef, latency: LatencySpec) -> Metrics:
    import torch

    if target.threads:
        torch.set_num_threads(target.threads)
    if not Path(artifact.path).is_dir():
        raise FileNotFoundError(f"artifact folder {artifact.path} is gone; delete .byoai/prefect-results to rebuild")
    model, load_s = load_artifact(artifact.path, target)
    windows = load_tokens(perplexity_tokens)
    ppl = measure_perplexity(model, windows, target.device)
    prompt = windows.flatten()[: latency.prompt_tokens]
    prefill_ms, decode_tok_s = measure_latency(model, prompt, latency, target.device)
    metrics = Metrics(
        ppl=ppl,
        ppl_tokens=int(windows.numel()),
        size_mb=artifact.size_bytes / 1e6,
        load_s=load_s,
        prefill_ms=prefill_ms,
        decode_tok_s=decode_tok_s,
        device=devices.describe(target.device),
    )
    step_logger().info("%s on %s: %s", artifact.technique, target.name, metrics)
    return metrics
