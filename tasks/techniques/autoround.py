"""AutoRound (Intel's SignRound): rounding and clipping tuned by signed gradient descent per block.

`auto-round` (installed with llm-compressor, which depends on it) quantizes on CPU with the
recipe's calibration windows and writes either a GGUF file in a llama.cpp type (its own bundled
copy of llama.cpp's conversion code; measured in llama.cpp) or a GPTQ-format folder (measured in
transformers, or exported by the onnx stage as it is). `iters: 0` is its optimized RTN.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from byoai.memory import calibrates_layerwise
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError

Export = Literal["q4_0", "q4_1", "q4_k_m", "q4_k_s", "q5_0", "q5_1", "q5_k_m", "q8_0", "gptq"]


class AutoRoundConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # a llama.cpp type (a GGUF file) or gptq (4-bit, group_size, a GPTQ-format folder)
    export: Export = "q4_0"
    iters: int = Field(default=200, ge=0)
    learning_rate: float | None = Field(default=None, gt=0)  # AutoRound's default: 1 / iters
    batch_size: int = Field(default=4, ge=1)
    group_size: int = Field(default=128, ge=32)  # gptq export only (GGUF types fix their blocks)
    seed: int = 42


def output_format(config: AutoRoundConfig) -> str:
    return "hf" if config.export == "gptq" else "gguf"


def run(inputs: BuildInputs) -> BuildResult:
    import torch
    from auto_round import AutoRound
    from auto_round.algorithms.composer import AlgorithmComposer

    from byoai.progress import counting_calls
    from byoai.tasks.runtimes.llama_cpp import GGUF_FILE, gguf_facts
    from byoai.tasks.techniques.gguf import copy_tokenizer
    from byoai.tasks.techniques.io import load_stage_input

    config: AutoRoundConfig = inputs.config
    model, tokenizer = load_stage_input(inputs.model_dir)
    n_samples, seq_len = inputs.calibration_ids.shape
    windows = [inputs.calibration_ids[i : i + 1] for i in range(n_samples)]
    gptq = config.export == "gptq"
    scheme = "W4A16" if gptq else f"gguf:{config.export}"
    extra = {"group_size": config.group_size, "sym": True} if gptq else {}
    if config.learning_rate is not None:
        extra["lr"] = config.learning_rate
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="byoai-autoround-", dir=inputs.out_dir.parent) as work:
        rounder = AutoRound(
            model, tokenizer, scheme=scheme, dataset=windows, iters=config.iters, nsamples=n_samples, seqlen=seq_len,
            batch_size=min(config.batch_size, n_samples), device_map=inputs.device, seed=config.seed,
            # its memory-lean modes: block inputs kept off the GPU, finished blocks offloaded to disk
            low_gpu_mem_usage=inputs.device == "cuda", low_cpu_mem_usage=True, **extra,
        )
        try:
            # one compress_block per decoder block: `building 12/32 layers` in the console
            with counting_calls(AlgorithmComposer, "compress_block", model.config.num_hidden_layers, "layers"):
                rounder.quantize_and_save(work, format="auto_gptq" if gptq else scheme)
        except (ValueError, NotImplementedError, AssertionError) as exc:
            raise TechniqueError(f"AutoRound cannot write {config.export} for this model: {exc}") from None
        facts: dict[str, object] = {
            "library": f"auto-round {version('auto-round')}", "iters": config.iters, "export": config.export,
            "calibration_tokens": int(n_samples * seq_len),
        }
        if gptq:
            saved = next((p.parent for p in Path(work).rglob("config.json")), None)
            if saved is None:
                raise TechniqueError("AutoRound wrote no model folder")
            for item in saved.iterdir():
                shutil.move(str(item), inputs.out_dir / item.name)
            return BuildResult(model_dir=inputs.out_dir, facts=facts | {"format": "gptq", "group_size": config.group_size})
        files = sorted(Path(work).rglob("*.gguf"), key=lambda p: p.stat().st_size)
        if not files:
            raise TechniqueError(f"AutoRound wrote no GGUF file for {config.export}")
        shutil.move(str(files[-1]), inputs.out_dir / GGUF_FILE)
    copy_tokenizer(inputs.model_dir, inputs.out_dir)
    facts |= {"format": "gguf", "quant_type": config.export, **gguf_facts(inputs.out_dir / GGUF_FILE)}
    return BuildResult(model_dir=inputs.out_dir, facts=facts, format="gguf")


def exported_size(config: AutoRoundConfig, shape) -> int:
    """The GGUF of its export type, or a GPTQ folder: 4 bits per Linear weight and a scale per group."""
    from byoai.memory import gguf_size, quantized_size

    return quantized_size(shape, 4 + 16 / config.group_size) if config.export == "gptq" else gguf_size(shape, config.export)


TECHNIQUE = Technique(
    name="autoround",
    summary="AutoRound (SignRound) on CPU: a GGUF (q4_0, q4_1, q4_k_m, ...) for llama.cpp or a GPTQ folder",
    config=AutoRoundConfig,
    footprint=calibrates_layerwise("AutoRound block by block (low_gpu_mem_usage)", artifact=exported_size),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
    output_format=output_format,
)
