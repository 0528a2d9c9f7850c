"""Loading and saving model folders the same way in every technique."""

from __future__ import annotations

import json
from pathlib import Path

from byoai.settings import hf_load_kwargs

LOAD_FILE = "byoai_load.json"


def write_load_kwargs(folder: Path, load_kwargs: dict) -> None:
    (folder / LOAD_FILE).write_text(json.dumps(load_kwargs, indent=2, sort_keys=True))


def load_kwargs(folder: Path) -> dict:
    """from_pretrained arguments a folder needs: e.g. a quantization applied at load time.

    Users loading a registered artifact themselves pass the same (see docs/techniques.md).
    """
    path = folder / LOAD_FILE
    if not path.is_file():
        return {}
    kwargs = json.loads(path.read_text())
    if "quantization_config" in kwargs:
        from transformers.quantizers.auto import AutoQuantizationConfig

        kwargs["quantization_config"] = AutoQuantizationConfig.from_dict(kwargs["quantization_config"])
    return kwargs


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint was saved in (config.json), float32 when it does not say."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in {"float32", "float16", "bfloat16"} else "float32"


def load_model(model_dir: Path, **kwargs):
    """Model (in the checkpoint's own dtype unless told otherwise) and tokenizer from a save_pretrained folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from byoai.tasks.techniques import model_loading

    kwargs = {"dtype": "auto", **hf_load_kwargs(), **load_kwargs(Path(model_dir)), **kwargs}
    if kwargs["dtype"] == "auto":  # explicit: a checkpoint that names no dtype loads as saved, float32
        import torch

        kwargs["dtype"] = getattr(torch, checkpoint_dtype(model_dir))
    with model_loading():
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    decompress_releasing_pages(model)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir, **hf_load_kwargs())


def is_plain_checkpoint(model_dir: Path) -> bool:
    """A save_pretrained folder of ordinary weights: no quantization config, nothing applied at load."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, **hf_load_kwargs())
    return getattr(config, "quantization_config", None) is None and not load_kwargs(Path(model_dir))


def checkpoint_bytes(model_dir: Path) -> int:
    """The weights' size on disk: what a technique would hold in memory, in the checkpoint's dtype."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def load_offloaded(model_dir: Path, offload_dir: Path):
    """A plain checkpoint whose weights stay on disk: compressed-tensors' disk cache (through
    llm-compressor's documented `load_offloaded_model`) reads each module from the checkpoint when
    it runs and writes updated weights to `offload_dir`. No host RAM is budgeted for weights, so
    every decoder layer is on disk and llm-compressor's sequential pipeline onloads one at a time."""
    import torch
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from byoai.tasks.techniques import model_loading

    with load_offloaded_model(), model_loading():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, checkpoint_dtype(model_dir)), device_map="auto_offload", max_memory={"cpu": 0},
            offload_folder=str(offload_dir), **hf_load_kwargs(),
        )
    return model.eval(), AutoTokenizer.from_pretrained(model_dir, **hf_load_kwargs())


def decompress_releasing_pages(model) -> None:
    """Decompress a packed compressed-tensors model now, module by module, handing back each
    module's packed checkpoint pages as soon as its dense weight exists.

    transformers leaves llm-compressor's packed weights (int4 in int32) memory-mapped from the
    checkpoint and registers a hook that decompresses the whole model at its first forward; the
    packed weights' mapped pages then stay resident beside the dense ones until the model goes
    (1B shape, W4 g128: 2.40 GB dense + 0.96 GB of mapped pages; at 8B the evaluation peaked at
    1.31 x the bf16 size). The loop is compressed-tensors' own (ModelCompressor.decompress_model,
    single process) plus the release; the hook is removed as that function removes it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if not hasattr(model, "ct_decompress_hook") or quantizer is None:
        return
    from compressed_tensors.compressors.base import decompress_module
    from compressed_tensors.offload import from_accelerate
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.utils.helpers import is_module_quantized

    compressor = quantizer.compressor
    from_accelerate(model)
    mapped = checkpoint_mappings()
    for module in [m for m in model.modules() if is_module_quantized(m)]:
        packed = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        decompress_module(module, compressor.force_compression_format)
        kept = {t.data_ptr() for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))}
        for tensor in packed:
            if tensor.data_ptr() not in kept:
                release_mapped_pages(tensor, mapped)
    if compressor.quantization_config is not None:
        compressor.quantization_config.quantization_status = QuantizationStatus.DECOMPRESSED
    compressor.remove_decompression_hook(model)


def load_stage_input(model_dir: Path, dtype: str = "auto"):
    """A stage's input as a plain dense model (in the checkpoint's dtype unless `dtype` says),
    whatever format the previous stage saved.

    compressed-tensors folders (llmcompressor's output: quantized and/or sparse) are decompressed
    and rebuilt without their quantization config, so the next technique starts from ordinary
    Linear weights. Other quantized formats cannot be undone: quantize last in a chain.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    config = AutoConfig.from_pretrained(model_dir, **hf_load_kwargs())
    quantization = getattr(config, "quantization_config", None)
    if quantization is None and not load_kwargs(Path(model_dir)):
        return load_model(model_dir, dtype=dtype)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if method != "compressed-tensors":
        from byoai.tasks.techniques import TechniqueError

        raise TechniqueError(
            f"a stage cannot start from a {method or 'load-time quantized'} checkpoint ({model_dir}); "
            "put this quantization last in the chain"
        )
    loaded, tokenizer = load_model(model_dir, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
    dense_config = AutoConfig.from_pretrained(model_dir, **hf_load_kwargs())
    del dense_config.quantization_config
    from byoai.tasks.techniques import model_loading

    with model_loading():
        model = AutoModelForCausalLM.from_config(dense_config, dtype=loaded.dtype)
    wanted = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in loaded.state_dict().items() if k in wanted}, strict=True)
    return model.eval(), tokenizer


def own_weights(model):
    """Give every parameter its own memory instead of the memory-mapped checkpoint's pages.

    transformers maps a safetensors checkpoint that is already in the load dtype without copying
    it; a technique that rewrites every weight (llm-compressor's GPTQ, AWQ, SparseGPT, ...) turns
    those pages into private copies that stay resident as long as any tensor of the file lives,
    so packing the weights at save kept the dense ones too (1B: +0.7 GB; 8B: killed at 23.7 GB).
    With owned weights, compressing a layer frees its dense weights. Costs one copy at load.

    The mapping itself lives until the last tensor of its shard is copied, so the pages already
    copied are handed back as we go (release_mapped_pages): otherwise the copy holds the weights
    twice (1B shape: a peak of 4.45 GB, 3.05 GB with the pages released; bf16 weights 2.35 GB).
    """
    import torch

    mapped = checkpoint_mappings()
    with torch.no_grad():
        for parameter in model.parameters():
            original = parameter.data
            parameter.data = original.clone()
            release_mapped_pages(original, mapped)
    return model


def checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped .safetensors files (Linux; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


def release_mapped_pages(tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the resident pages of a tensor that a checkpoint file maps, once it has been copied.

    madvise(MADV_DONTNEED) on a file mapping only unmaps the pages from this process (they stay
    in the page cache, and would be read from the file again if touched). Only whole pages that
    lie inside this tensor's own bytes are released, so no other tensor loses a page.
    """
    import ctypes
    import mmap

    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    if not any(low <= start and start + size <= high for low, high in mapped):
        return
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), mmap.MADV_DONTNEED)


def save_model(model, tokenizer, out_dir: Path, **kwargs) -> None:
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)


def saved(model, tokenizer, inputs, facts: dict, probe_first: bool = False, **save_kwargs):
    """Save a built model into inputs.out_dir and describe it: the facts, plus its logits on the
    probe windows, which the build step compares with the reloaded folder.

    Saving comes first by default: some formats (bitsandbytes 4-bit on CPU) change their in-memory
    weights at the first forward. `probe_first` computes the logits before saving, for formats
    whose save packs the weights in place (llm-compressor's compressed-tensors: a forward after it
    decompresses the whole model again, a second copy of it in memory).
    """
    from byoai.tasks.techniques import BuildResult, probe_ids

    probe = logits(model, probe_ids(inputs.calibration_ids)) if probe_first else None
    save_model(model, tokenizer, inputs.out_dir, **save_kwargs)
    if probe is None:
        probe = logits(model, probe_ids(inputs.calibration_ids))
    return BuildResult(model_dir=inputs.out_dir, facts=facts, probe_logits=probe)


def logits(model, ids):
    """Float32 logits on CPU for `ids`, computed on the model's own device."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(ids.to(device)).logits.float().cpu()


def weight_sparsity(model) -> float:
    """Fraction of exact zeros in the decoder's Linear weights (lm_head and embeddings excluded)."""
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        # not a tensor: GPTQModel's packed layers expose a metadata object as `weight`
        if name.endswith("lm_head") or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or isinstance(module, torch.nn.Embedding):
            continue
        if hasattr(weight, "__tensor_flatten__") and hasattr(weight, "dequantize"):
            weight = weight.dequantize()  # a torchao tensor subclass (int8_cpu): count its float values
        if weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0
