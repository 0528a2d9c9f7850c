"""Runtime `onnxruntime_genai`: an ONNX model folder (the `onnx` stage's output) run by ONNX Runtime GenAI.

Nothing is compiled per target: the onnxruntime-genai wheel carries ONNX Runtime's CPU kernels
(MatMulNBits for int4/int8 weights) and its CUDA package the GPU ones. The execution provider
comes from the target's device, the intra-op threads from its `threads`. Perplexity reads the
model's own logits for every position of a window (GenAI's `logits` output after one prefill),
so its rows use the same token ids and the same arithmetic as every other runtime's.
"""

from __future__ import annotations

import json
import resource
import time
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from byoai.settings import hf_load_kwargs
from byoai.tasks.runtimes.base import MeasureRequest, Runtime, RuntimeBuild, RuntimeUnavailable

PACKAGE = "onnxruntime-genai"
CONFIG_FILE = "genai_config.json"


class OnnxGenaiConfig(BaseModel):
    """Nothing to build: the onnxruntime-genai package installed with byoai is the runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _versions() -> tuple[str, str] | None:
    try:
        return metadata.version(PACKAGE), metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return None


def unavailable_reason(config: OnnxGenaiConfig, device: str) -> str | None:
    if _versions() is None:
        return f"{PACKAGE} is not installed on this worker (pip install -c constraints.txt '.[onnx]'; infra/install.sh does)"
    if device == "cuda":
        import onnxruntime_genai as og

        if not og.is_cuda_available():
            return f"a cuda target needs the CUDA build of {PACKAGE} (pip install onnxruntime-genai-cuda) and an NVIDIA GPU; this worker's build has no CUDA"
    return None


def build(config: OnnxGenaiConfig, cache_dir: Path) -> RuntimeBuild:
    versions = _versions()
    if versions is None:
        raise RuntimeUnavailable(unavailable_reason(config, "cpu"))
    genai, ort = versions
    return RuntimeBuild(runtime="onnxruntime_genai", key=f"ortgenai-{genai}-ort-{ort}", path="", version=genai,
                        system_info=f"onnxruntime {ort}")


def silence() -> None:
    """No telemetry (byoai runs on closed networks) and no console chatter from the runtime."""
    import onnxruntime_genai as og

    og.disable_telemetry_events()
    og.set_log_options(enabled=False)


class OnnxGenaiSession:
    """A model folder with genai_config.json, model.onnx (+ its external data) and the tokenizer."""

    def __init__(self, request: MeasureRequest):
        import onnxruntime_genai as og

        from byoai import devices

        silence()
        self.og = og
        self.device = request.device
        self.path = Path(request.artifact_path)
        latency = request.latency
        # Room for the longest sequence the protocol runs; perplexity windows set their own.
        self.latency_length = max([latency["prompt_tokens"], *latency["prompt_lengths"]]) + latency["new_tokens"] + 2
        started = time.perf_counter()
        config = og.Config(str(self.path))
        config.clear_providers()
        if self.device == "cuda":
            config.append_provider("cuda")
        if request.threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": request.threads}}}}))
        self.model = og.Model(config)
        self.load_s = time.perf_counter() - started
        genai = json.loads((self.path / CONFIG_FILE).read_text())
        self.max_context = genai["model"]["context_length"]
        self.description = (
            f"{devices.describe(self.device)}; onnxruntime-genai {request.build.version} "
            f"({request.build.system_info}, {'CUDA' if self.device == 'cuda' else 'CPU'} execution provider)"
        )

    def _generator(self, batch: int, max_length: int):
        params = self.og.GeneratorParams(self.model)
        # greedy, and never stopped early by an end-of-sequence token (fixed work per timing)
        params.set_search_options(batch_size=batch, max_length=max_length, min_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def sequence_logits(self, ids: list[int]):
        """Logits [len(ids), vocab] of one sequence processed from an empty state."""
        import numpy as np
        import torch

        if len(ids) > self.max_context:
            raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.max_context} (genai_config.json)")
        generator = self._generator(1, len(ids) + 1)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        logits = generator.get_output("logits")
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)[0])

    def logprobs(self, ids: list[int]):
        import torch

        return torch.log_softmax(self.sequence_logits(ids).double(), dim=-1)

    def nll(self, window) -> float:
        import torch

        logits = self.sequence_logits(window.tolist())
        return torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum").item()

    def prefill(self, prompts):
        """The prompt processed and its first token chosen: what time-to-first-token measures."""
        import numpy as np

        batch, _ = prompts.shape
        generator = self._generator(batch, self.latency_length)
        generator.append_tokens(prompts.numpy().astype(np.int32))
        generator.generate_next_token()
        return generator

    def decode(self, state, steps: int) -> None:
        for _ in range(steps):
            state.generate_next_token()

    def sync(self) -> None:
        """GenAI's calls return when their work is done (outputs are copied back)."""

    def memory(self) -> dict[str, float]:
        weights = sum(f.stat().st_size for f in self.path.iterdir() if f.suffix in {".onnx", ".data"})
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"weights_mb": weights / 1e6, "peak_mem_mb": peak_kb * 1024 / 1e6}

    def lm_eval_model(self, spec):
        from transformers import AutoTokenizer

        from byoai.tasks.lm_eval_tasks import LogitsLM

        tokenizer = AutoTokenizer.from_pretrained(self.path, **hf_load_kwargs())
        return LogitsLM(self.logprobs, tokenizer, max_length=min(2048, self.max_context))


def footprint(ctx, artifact_bytes: int):
    """ONNX Runtime reads the weights into its own buffers, plus KV cache and logits."""
    from byoai.memory import PROCESS_BYTES, Footprint

    w = ctx.windows
    buffers = max(w.eval_seq_len, w.latency_context) * ctx.shape.kv_bytes_per_token * 2 + w.eval_seq_len * ctx.shape.vocab * 4 * 2
    why = f"the ONNX weights ({artifact_bytes / 1e9:.1f} GB) in ONNX Runtime's buffers, KV cache and logits"
    if ctx.device == "cpu":
        return Footprint(host=PROCESS_BYTES + artifact_bytes + buffers, why=why)
    return Footprint(host=PROCESS_BYTES, device=artifact_bytes + buffers, why=why)


RUNTIME = Runtime(
    name="onnxruntime_genai",
    summary="ONNX Runtime GenAI (the onnxruntime-genai package; CPU or CUDA execution provider); runs the onnx stage's folders",
    formats=frozenset({"onnx"}),
    devices=frozenset({"cpu", "cuda"}),
    config=OnnxGenaiConfig,
    unavailable_reason=unavailable_reason,
    build=build,
    open_session=OnnxGenaiSession,
    footprint=footprint,
)
