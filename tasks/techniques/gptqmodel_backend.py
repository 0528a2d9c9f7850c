"""What the `backend: gptqmodel` variants of gptq and awq share: setup, build, save, reference.

GPTQModel (ModelCloud) is the maintained successor of AutoGPTQ: transformers, optimum and peft
load its checkpoints through it, and it also quantizes and loads the format AutoAWQ wrote. Its
workflow is folder in -> quantize -> save -> load: the in-memory model after quantize() holds
packed tensors meant for saving, not for inference (its logits are wrong), so the reference for
the build step's save/reload check is computed by GPTQModel's own loader from the saved folder
(see reference_logits).

Not a technique itself; gptq.py and awq.py build their GPTQModel config and call build().
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from byoai.settings import hf_load_kwargs
from byoai.tasks.techniques import BuildInputs, BuildResult, TechniqueError, model_loading, probe_ids

GENERATION_CONFIG = "generation_config.json"

# GPTQModel sizes its CPU worker pools when it is imported, and its model loader asks for 2
# workers: with its default of 1 on a 2-core machine, quantizing fails ("Virtual pool
# 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"). Set here, at import of the
# technique registry, so it precedes any import of gptqmodel (transformers imports it to load a
# GPTQ checkpoint); a value the user set is kept. Same default as GPTQModel's otherwise.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(12, ((os.cpu_count() or 1) + 1) // 2))))


@contextmanager
def device_thread_pool():
    """GPTQModel's work, then its global device thread pool shut down.

    GPTQModel runs on a lazily built pool of worker threads, each pinned to a CPU core, that
    outlives the call: measured on this 2-core CPU, SmolLM2 then decodes at 17 tok/s instead of 31
    in the same process, which would skew every latency measured after a GPTQModel build. The
    pool is rebuilt on the next use (gptqmodel.get_device_thread_pool).
    """
    import gptqmodel

    try:
        yield
    finally:
        pool = getattr(gptqmodel, "_DEVICE_THREAD_POOL", None)
        if pool is not None:
            pool.shutdown(wait=True)
            gptqmodel._DEVICE_THREAD_POOL = None


def require_only_lm_head_ignored(ignore: tuple[str, ...]) -> None:
    """GPTQModel can skip modules (its `dynamic` rules), but transformers cannot load the result.

    Checked on this stack: skipping down_proj -> transformers' loader fails with a shape error;
    quantizing lm_head too -> it loads but computes garbage (logits 140 % off). So the gptqmodel
    backend keeps exactly lm_head in full precision, like its default.
    """
    if tuple(ignore) != ("lm_head",):
        raise TechniqueError(
            f"backend gptqmodel keeps exactly lm_head in full precision (params.ignore: [lm_head]); "
            f"got ignore: {list(ignore)}. transformers cannot load a GPTQModel checkpoint that skips "
            "other layers or quantizes lm_head. Use backend: llmcompressor for a custom ignore list."
        )


# Group sizes whose checkpoints transformers runs correctly on CPU (GPTQModel's int4 ATen kernels):
# 16 is accepted by GPTQModel but crashes torch's int4 matmul ("expect qGroupSize to be 32, 64,
# 128 or 256"); -1 and 256 run on other kernels this project has no exact check for.
GROUP_SIZES = (32, 64, 128)


def require_supported_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise TechniqueError(
            f"backend gptqmodel supports group_size {', '.join(map(str, GROUP_SIZES))} (got {group_size}): "
            "the CPU kernel transformers uses for its checkpoints. Use one of them, or backend: llmcompressor."
        )


def calibration_rows(calibration_ids) -> list[dict[str, list[int]]]:
    """The recipe's calibration windows in GPTQModel's input format (equal lengths: no padding)."""
    return [{"input_ids": row, "attention_mask": [1] * len(row)} for row in calibration_ids.tolist()]


def offload_to_disk(setting: str, inputs: BuildInputs) -> bool:
    """GPTQModel's offload_to_disk (each finished layer to a temporary folder) as the `offload`
    setting says; `auto`: byoai.memory.offloads_to_disk's rule (a small model would only pay the
    disk time: 4x on the tiny model)."""
    from byoai.hostmem import available_bytes
    from byoai.memory import offloads_to_disk
    from byoai.tasks.techniques.io import checkpoint_bytes

    return offloads_to_disk(setting, checkpoint_bytes(inputs.model_dir), available_bytes(), inputs.device)


@contextmanager
def plain_input(inputs: BuildInputs, model, tokenizer):
    """A folder GPTQModel can read (it loads folders, not model objects): yields its path.

    A plain checkpoint is used as it is; an earlier stage's compressed-tensors output is saved
    dense, as load_stage_input decoded it, into a temporary folder removed afterwards. The caller
    can drop its own model inside the block: GPTQModel loads its own copy.
    """
    from byoai.tasks.techniques.io import is_plain_checkpoint, save_model

    if is_plain_checkpoint(inputs.model_dir):
        del model  # this frame lives as long as the block: hold no reference to the model
        yield inputs.model_dir
        return
    with tempfile.TemporaryDirectory(prefix="byoai-gptqmodel-") as scratch:
        save_model(model, tokenizer, Path(scratch))
        del model
        yield Path(scratch)


def build(inputs: BuildInputs, source: Path, tokenizer, quantize_config, *, dtype, kernel=None) -> dict[str, Any]:
    """Quantize `source` (see plain_input) with GPTQModel into inputs.out_dir; returns its facts.

    `dtype` is the precision GPTQModel loads and calibrates in, which is also the dtype of the
    tensors it leaves unquantized (embeddings, lm_head, norms) in the checkpoint. `kernel` is the
    GPTQModel BACKEND used while quantizing (None: GPTQModel picks).
    """
    import torch
    from gptqmodel import BACKEND, GPTQModel

    from byoai.progress import advance

    with device_thread_pool():
        with model_loading():
            quantizer = GPTQModel.load(str(source), quantize_config, device=inputs.device, dtype=dtype, **hf_load_kwargs())
        # GPTQModel's own per-layer hook (its looper calls it as each layer is quantized, then
        # again once the layer is finalized): `building 12/30 layers` in the console
        layers = quantizer.model.config.num_hidden_layers
        quantizer.layer_callback = lambda layer_idx, submodule_finalized: (
            advance(min(layer_idx + 1, layers), layers, "layers") if submodule_finalized else None)
        # batch 1: the windows all have the same length, batching would only change peak memory
        quantizer.quantize(calibration_rows(inputs.calibration_ids), batch_size=1, backend=kernel or BACKEND.AUTO)
        quantizer.save(str(inputs.out_dir))
        del quantizer
    # GPTQModel saves the tokenizer and generation config it normalized (a pad token it filled
    # in; do_sample switched on because the config has a temperature): keep the input's, like
    # every other technique does, so a variant generates as its base model does.
    tokenizer.save_pretrained(inputs.out_dir)
    if (Path(source) / GENERATION_CONFIG).is_file():
        shutil.copyfile(Path(source) / GENERATION_CONFIG, Path(inputs.out_dir) / GENERATION_CONFIG)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return saved_facts(inputs.out_dir)


def saved_facts(folder: Path) -> dict[str, Any]:
    """What the checkpoint says about itself: format, bits, groups, and its float dtype."""
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    quant = config["quantization_config"]
    facts = {
        "backend": "gptqmodel",
        "library": f"gptqmodel {version('gptqmodel')}",
        "quant_method": quant["quant_method"],
        "checkpoint_format": quant.get("checkpoint_format") or quant.get("format"),
        "bits": quant["bits"],
        "group_size": quant["group_size"],
        # embeddings, lm_head and norms stay in the dtype GPTQModel quantized in
        "unquantized_dtype": config.get("dtype") or config.get("torch_dtype"),
    }
    if "sym" in quant:
        facts["sym"] = quant["sym"]
    if "zero_point" in quant:
        facts["zero_point"] = quant["zero_point"]
    if quant["quant_method"] == "gptq":
        facts["desc_act"] = quant.get("desc_act")
        facts["static_groups"] = quant.get("meta", {}).get("static_groups")
        facts["act_group_aware"] = quant.get("meta", {}).get("act_group_aware")
    return facts


def reference_logits(folder: Path, ids, device: str) -> tuple[Any, str]:
    """Logits of the saved folder as GPTQModel itself computes them, and how they were computed.

    The build step reloads the folder with transformers (optimum + GPTQModel's kernels) and
    compares with these: a disagreement means transformers reads the checkpoint differently from
    the library that wrote it (format version, zero points, g_idx, ...).

    - 4-bit on CPU: GPTQModel's own loader with the kernel transformers picks there (its int4
      ATen kernel, which computes in bfloat16 whatever the model dtype), loaded in bfloat16 and
      upcast, as transformers does when asked for float32: equal to the bit when the checkpoint's
      float tensors are bfloat16 (why the CPU builds quantize in bfloat16). Not GPTQModel's
      float32 default kernel on CPU: it decodes asymmetric GPTQ checkpoints wrongly (64 % off on
      the tiny model, where transformers and the dequantized weights agree).
    - CUDA: GPTQModel's own loader and kernel choice, in float16 (not verified on a GPU).
    - otherwise (2/3/8-bit GPTQ on CPU): GPTQModel's file-level dequantizer, run as a dense
      float32 model; transformers' torch kernel then computes the same float32 product (1e-4
      apart on the tiny model). Not for AWQ: the dequantizer misreads AWQ's packing order (113 %
      off where three GPTQModel kernels and transformers agree); AWQ is 4-bit, so it never gets
      here.
    """
    import json

    import torch
    from gptqmodel import BACKEND, GPTQModel

    from byoai.tasks.techniques.io import logits

    quant = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    if device == "cpu" and quant["bits"] == 4:
        kernel = BACKEND.AWQ_TORCH_ATEN if quant["quant_method"] == "awq" else BACKEND.GPTQ_TORCH_ATEN
        try:
            with model_loading():
                loaded = GPTQModel.load(str(folder), device="cpu", backend=kernel, dtype=torch.bfloat16)
        except (ValueError, NotImplementedError):  # no ATen kernel for it: transformers picks another
            pass
        else:
            result = logits(loaded.model.float(), ids)
            del loaded
            return result, f"gptqmodel loader ({kernel.value} kernel)"

    if device == "cuda":
        # Untested here (no GPU): GPTQModel's own pick of CUDA kernel, in float16, its precision.
        with model_loading():
            loaded = GPTQModel.load(str(folder), device="cuda", dtype=torch.float16)
        result = logits(loaded.model, ids)
        del loaded
        return result, "gptqmodel loader (float16, its CUDA kernel)"

    from gptqmodel.utils.model_dequant import dequantize_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="byoai-dequant-") as scratch:
        dense_dir = Path(scratch) / "dense"
        dequantize_model(folder, dense_dir, target_dtype=torch.float32)
        with model_loading():
            dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32, device_map=device, **hf_load_kwargs()).eval()
        result = logits(dense, ids)
        del dense
    return result, "gptqmodel dequantized to dense float32"


def finish(inputs: BuildInputs, facts: dict[str, Any], **more: Any) -> BuildResult:
    """BuildResult with the reference logits of the saved folder (see reference_logits)."""
    with device_thread_pool():
        probe, how = reference_logits(inputs.out_dir, probe_ids(inputs.calibration_ids), inputs.device)
    # the references are float32 computations (an upcast bfloat16 model, or dense float32 weights)
    return BuildResult(model_dir=inputs.out_dir, probe_logits=probe, probe_dtype="float32", facts={**facts, **more, "probe_reference": how})
