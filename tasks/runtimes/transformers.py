"""Runtime `transformers`: the artifact folder loaded with from_pretrained on the target device.

It runs every save_pretrained format byoai writes (dense, compressed-tensors, GPTQ/AWQ through
GPTQModel's kernels, bitsandbytes, torchao) in a worker process, like every runtime: nothing is
compiled per target.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from byoai.settings import hf_load_kwargs
from byoai.tasks.runtimes.base import MeasureRequest, Runtime, RuntimeBuild


class TransformersConfig(BaseModel):
    """Nothing to build: transformers and torch are installed with byoai."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def load_artifact(path: str, device: str, dtype: str):
    """Load the folder as the target will; return the model and the wall time it took."""
    import torch

    from byoai.tasks.techniques.io import load_model

    started = time.perf_counter()
    # device_map places weights at load: quantized (e.g. bitsandbytes) models refuse a later .to()
    model, _ = load_model(Path(path), dtype=dtype if dtype == "auto" else getattr(torch, dtype), device_map=device)
    _sync(device)
    return model, time.perf_counter() - started


class TransformersSession:
    def __init__(self, request: MeasureRequest):
        import torch

        from byoai import devices

        if request.threads:
            torch.set_num_threads(request.threads)
        if request.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.path, self.device = request.artifact_path, request.device
        self.model, self.load_s = load_artifact(request.artifact_path, request.device, request.dtype)
        self.description = devices.describe(request.device)

    def nll(self, window) -> float:
        import torch

        with torch.inference_mode():
            ids = window[None].to(self.device)
            logits = self.model(ids).logits.float()
            return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()

    def prefill(self, prompts):
        import torch

        with torch.inference_mode():
            return self.model(prompts.to(self.device), use_cache=True)

    def decode(self, state, steps: int) -> None:
        import torch

        with torch.inference_mode():
            past, token = state.past_key_values, state.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                out = self.model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def sync(self) -> None:
        _sync(self.device)

    def memory(self) -> dict[str, float]:
        import resource

        import torch

        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        # a true peak: the process's high-water mark (it measures this artifact alone, in a worker)
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"weights_mb": weights / 1e6, "peak_mem_mb": peak / 1e6}

    def lm_eval_model(self, spec):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoTokenizer

        return HFLM(pretrained=self.model, tokenizer=AutoTokenizer.from_pretrained(self.path, **hf_load_kwargs()), batch_size=spec.batch_size)


def build(config: TransformersConfig, cache_dir: Path) -> RuntimeBuild:
    from importlib.metadata import version

    import torch

    return RuntimeBuild(
        runtime="transformers",
        key=f"transformers-{version('transformers')}-torch-{torch.__version__}",
        path="",
        version=version("transformers"),
        system_info=f"torch {torch.__version__}",
    )


def footprint(ctx, artifact_bytes: int):
    from byoai.memory import PROCESS_BYTES, Footprint, runs_dense

    need = runs_dense(ctx)
    why = f"{ctx.dtype} weights of {ctx.shape.params / 1e9:.1f} B parameters, float32 logits of a {ctx.windows.eval_seq_len}-token window"
    if ctx.device == "cpu":
        return Footprint(host=PROCESS_BYTES + need, why=why)
    return Footprint(host=PROCESS_BYTES + artifact_bytes, device=need, why=why)


RUNTIME = Runtime(
    name="transformers",
    summary="from_pretrained on the target device (torch); runs every save_pretrained format byoai writes",
    formats=frozenset({"hf"}),
    devices=frozenset({"cpu", "cuda"}),
    config=TransformersConfig,
    unavailable_reason=lambda config, device: None,
    build=build,
    open_session=TransformersSession,
    footprint=footprint,
)
