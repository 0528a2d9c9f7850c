"""The measurement protocol every runtime is held to, so their rows sit in one table.

Perplexity: exp(mean NLL) over the same non-overlapping token windows (the same ids in every
runtime, never re-tokenized). TTFT per prompt length and greedy decode speed per batch size:
warm-ups first, then `repeats` timings, median with min and max. Memory: weights as held, peak,
the measured copy bandwidth and the resulting bound on batch-1 decode. lm-eval tasks through the
runtime's own lm-eval model.
"""

from __future__ import annotations

import math
import statistics
import time
from functools import cache

from byoai.tasks.runtimes.base import Measured, Session


def _timed(session: Session, fn) -> float:
    session.sync()
    started = time.perf_counter()
    fn()
    session.sync()
    return time.perf_counter() - started


def _spread(samples: list[float]) -> tuple[float, float, float]:
    return statistics.median(samples), min(samples), max(samples)


def perplexity(session: Session, windows, known_nll: tuple[float, ...] = ()) -> tuple[float, tuple[float, ...]]:
    """GPTQ-paper protocol: exp(mean NLL) over non-overlapping windows [n, seq_len] of one text;
    and each window's summed NLL (the perplexity of its first k windows follows from them). The
    first windows' NLLs, when `known_nll` has them, are not scored again."""
    nll = tuple(known_nll) + tuple(session.nll(row) for row in windows[len(known_nll):])
    return window_perplexity(nll, windows.shape[1]), nll


def window_perplexity(nll: tuple[float, ...], seq_len: int) -> float:
    """exp(mean NLL per predicted token) of windows of seq_len tokens, from their summed NLLs."""
    return math.exp(sum(nll) / (len(nll) * (seq_len - 1)))


def latency(session: Session, windows, spec) -> dict[str, float]:
    """TTFT per prompt length and greedy decode speed per batch size (byoai.recipe.LatencySpec)."""
    import torch

    tokens = windows.flatten()
    profile: dict[str, float] = {}
    for length in sorted({spec.prompt_tokens, *spec.prompt_lengths}):
        ids = tokens[:length][None]
        samples = [_timed(session, lambda: session.prefill(ids)) * 1000 for _ in range(spec.warmup + spec.repeats)][spec.warmup:]
        profile[f"ttft_ms.p{length}"], profile[f"ttft_ms.p{length}.min"], profile[f"ttft_ms.p{length}.max"] = _spread(samples)
    for batch in sorted({1, *spec.batch_sizes}):
        # distinct prompts per row, as concurrent requests would be
        ids = torch.stack([tokens[i * 7 : i * 7 + spec.prompt_tokens] for i in range(batch)])
        speeds = []
        for attempt in range(spec.warmup + spec.repeats):
            state = session.prefill(ids)
            seconds = _timed(session, lambda: session.decode(state, spec.new_tokens))
            if attempt >= spec.warmup:
                speeds.append(batch * spec.new_tokens / seconds)
        median, low, high = _spread(speeds)
        profile[f"decode_tok_s.b{batch}"], profile[f"decode_tok_s.b{batch}.min"], profile[f"decode_tok_s.b{batch}.max"] = median, low, high
        profile[f"tpot_ms.b{batch}"] = batch * 1000 / median
    return profile


@cache
def memory_bandwidth_gb_s(device: str) -> float:
    """Measured copy bandwidth (read + write) of a 256 MB buffer: the ceiling for decode."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    source = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    timings = []
    for _ in range(5):
        sync()
        started = time.perf_counter()
        target.copy_(source)
        sync()
        timings.append(time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / min(timings) / 1e9


def measure(session: Session, windows, spec, lm_eval=None, parts: str = "all", known_nll: tuple[float, ...] = ()) -> Measured:
    """The whole protocol on one loaded artifact, or one part of it (an auto search's rung):
    "perplexity" skips the latency profile and the tasks (their numbers are 0 and empty), "speed"
    is the latency profile alone (perplexity NaN, no windows scored). `known_nll`: the first
    windows' summed NLLs, scored already on this artifact in this runtime; they are not scored again."""
    from byoai.tasks.lm_eval_tasks import score_lm

    if parts == "speed":
        profile = latency(session, windows, spec) | session.memory()
        return Measured(ppl=math.nan, ppl_tokens=0, load_s=session.load_s, prefill_ms=profile[f"ttft_ms.p{spec.prompt_tokens}"],
                        decode_tok_s=profile["decode_tok_s.b1"], device=session.description, profile=profile)
    ppl, window_nll = perplexity(session, windows, known_nll)
    if parts == "perplexity":
        return Measured(ppl=ppl, ppl_tokens=int(windows.numel()), window_nll=window_nll, load_s=session.load_s, prefill_ms=0.0,
                        decode_tok_s=0.0, device=session.description, profile=session.memory())
    profile = latency(session, windows, spec)
    profile |= session.memory() | ({"ppl_windows_reused": len(known_nll)} if known_nll else {})
    bandwidth = memory_bandwidth_gb_s(session.device)
    decode_tok_s = profile["decode_tok_s.b1"]
    profile |= {
        "bandwidth_gb_s": bandwidth,
        # batch-1 decode reads every weight once per token: tokens/s <= bandwidth / weight bytes
        "decode_bound_tok_s": bandwidth * 1e3 / profile["weights_mb"],
    }
    profile["decode_efficiency"] = decode_tok_s / profile["decode_bound_tok_s"]
    return Measured(
        ppl=ppl,
        ppl_tokens=int(windows.numel()),
        window_nll=window_nll,
        load_s=session.load_s,
        prefill_ms=profile[f"ttft_ms.p{spec.prompt_tokens}"],
        decode_tok_s=decode_tok_s,
        device=session.description,
        profile=profile,
        tasks=score_lm(session.lm_eval_model(lm_eval), lm_eval) if lm_eval else {},
    )
