"""The memory plan: each variant x target x runtime's peak host RAM (and device memory on GPU
targets), estimated before anything loads, and compared with what the worker has.

The model's shape comes from its `config.json` (an empty model built on the `meta` device gives
the exact parameters per tensor, no weight read) or a GGUF file's metadata (gguf-py). Each
technique and runtime states its own footprint next to its config, in its own module
(`Technique.footprint`, `Runtime.footprint`); the plan only adds them up. Every number here is
bytes; the reasons print GB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# What a worker process costs before it loads a model: Python, torch, transformers imported.
PROCESS_BYTES = int(0.7e9)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model, from its config or GGUF metadata."""

    params: int
    embedding_params: int  # input embeddings + untied lm_head: kept in float by most techniques
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    dtype: str  # as saved: float32, bfloat16, float16
    kv_bytes_per_token: int  # K and V of every layer in f16/bf16, per token of context

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder's Linear layers: what weight quantization quantizes."""
        return self.params - self.embedding_params

    def bytes_in(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]

    def describe(self) -> str:
        return f"{self.params / 1e9:.2f} B parameters in {self.dtype}, {self.layers} layers, hidden {self.hidden}, vocabulary {self.vocab}"


def shape_from_config(config: dict) -> ModelShape:
    """Exact per-tensor counts from an empty model on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tensors = dict(model.named_parameters())  # tied weights appear once
    embedding = sum(t.numel() for name, t in tensors.items() if "embed_tokens" in name or name.endswith("lm_head.weight"))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return ModelShape(
        params=sum(t.numel() for t in tensors.values()),
        embedding_params=embedding,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        vocab=text.vocab_size,
        dtype=dtype if dtype in DTYPE_BYTES else "float32",
        kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * head_dim * 2,
    )


def shape_from_gguf(path: Path) -> ModelShape:
    """The shape a GGUF file's metadata and tensor infos give (llama-style architectures)."""
    from byoai.files import gguf_reader

    reader = gguf_reader(path)

    def value(suffix: str, default: int = 0) -> int:
        for key, f in reader.fields.items():
            if key.endswith(suffix) and f.data:
                return int(f.parts[f.data[0]][0])
        return default

    sizes = {t.name: int(t.n_elements) for t in reader.tensors}
    hidden, heads = value(".embedding_length"), value(".attention.head_count", 1)
    kv_heads = value(".attention.head_count_kv", heads)
    layers = value(".block_count")
    vocab = next((int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), 0)
    return ModelShape(
        params=sum(sizes.values()),
        embedding_params=sum(n for name, n in sizes.items() if name in {"token_embd.weight", "output.weight"}),
        layers=layers,
        hidden=hidden,
        intermediate=value(".feed_forward_length", 4 * hidden),
        vocab=vocab,
        # materialized as float32 (the embedded model) or bfloat16 when that would not fit
        dtype="float32",
        kv_bytes_per_token=2 * layers * kv_heads * (value(".attention.key_length") or hidden // max(heads, 1)) * 2,
    )


def shape_of_folder(folder: Path) -> ModelShape:
    return shape_from_config(json.loads((folder / "config.json").read_text()))


@dataclass(frozen=True)
class Windows:
    """The recipe's token budgets that footprints scale with."""

    calibration_samples: int
    calibration_seq_len: int
    eval_seq_len: int
    latency_context: int  # the longest context the latency profile builds (all batches side by side)
    max_batch: int
    serving_context: int = 0  # a server's KV cache: slots x (prompt + new tokens); 0 without serving
    # a speculative pair's draft beside the main file in the server, as a share of the main file
    # (auto drafts are at most half of it); 0 without speculative decoding
    draft_share: float = 0.0


@dataclass(frozen=True)
class Footprint:
    """A step's estimated peak: host RAM, device memory (GPU builds and runtimes), and why."""

    host: int
    why: str
    device: int = 0
    # the technique's output size (file on disk), which the runtime that measures it needs
    artifact: int | None = None


@dataclass(frozen=True)
class PlanContext:
    shape: ModelShape
    windows: Windows
    device: str  # the target's device: where builds and runtimes put the weights
    dtype: str  # what the target runs a save_pretrained folder in (its profile's dtype, resolved)
    input_bytes: int  # the stage input's size on disk (the base model's for the first stage)
    host_capacity: int  # the host RAM the plan is for: this worker's available, or the target profile's


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


# ---------------------------------------------------------------- footprints shared by techniques
def loads_model(extra_per_param: float = 0.0, note: str = "") -> callable:
    """The footprint of a technique that loads the stage input whole in its dtype, changes it in
    place, saves it and (after freeing it) reloads the saved folder: weights once, plus
    `extra_per_param` bytes per parameter of its own work, plus one forward pass."""

    def footprint(config, ctx: PlanContext) -> Footprint:
        weights = ctx.shape.bytes_in(ctx.shape.dtype)
        extra = int(extra_per_param * ctx.shape.params)
        host = PROCESS_BYTES + weights + extra + forward_bytes(ctx)
        why = f"{ctx.shape.dtype} load of {ctx.shape.params / 1e9:.1f} B parameters" + (f", {note}" if note else "")
        if ctx.device == "cpu":
            return Footprint(host=host, why=why, artifact=ctx.input_bytes)
        return Footprint(host=PROCESS_BYTES + weights, device=weights + extra + forward_bytes(ctx), why=why, artifact=ctx.input_bytes)

    return footprint


def forward_bytes(ctx: PlanContext, seq_len: int | None = None, batch: int = 1) -> int:
    """One forward pass without gradients: float32 logits (and their softmax) over the vocabulary,
    plus a layer's activations."""
    seq = seq_len or max(ctx.windows.eval_seq_len, ctx.windows.calibration_seq_len)
    logits = batch * seq * ctx.shape.vocab * 4 * 2
    activations = batch * seq * (4 * ctx.shape.hidden + 2 * ctx.shape.intermediate) * 4
    return logits + activations


def quantized_size(shape: ModelShape, bits_per_weight: float, embedding_dtype: str | None = None) -> int:
    """A weight-quantized file: Linear weights at `bits_per_weight` (scales included), embeddings
    and head in `embedding_dtype` (the checkpoint's, unless given)."""
    embedding_bytes = DTYPE_BYTES[embedding_dtype or shape.dtype]
    return int(shape.linear_params * bits_per_weight / 8 + shape.embedding_params * embedding_bytes)


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Capacity:
    host: int
    device: int | None  # None: no GPU to plan for
    source: str  # where the numbers come from: "this worker" or "profile cuda-h100"


@dataclass
class PlanRow:
    variant: str
    target: str
    runtime: str  # "" for the build row
    step: str  # "build" or "evaluate"
    host: int
    device: int
    why: str


@dataclass
class VariantPlan:
    variant: str
    target: str
    rows: list[PlanRow] = field(default_factory=list)
    capacity: Capacity | None = None
    artifact: int = 0  # the estimated size of what its last stage writes

    @property
    def peak_host(self) -> int:
        return max((r.host for r in self.rows), default=0)

    @property
    def peak_device(self) -> int:
        return max((r.device for r in self.rows), default=0)

    def skip_reason(self) -> str | None:
        """Why this variant cannot run on the capacity, with the numbers; None when it fits."""
        if self.capacity is None or not self.rows:
            return None
        host_row = max(self.rows, key=lambda r: r.host)
        if host_row.host > self.capacity.host:
            return (f"needs ~{gb(host_row.host)} host RAM ({host_row.step}{' in ' + host_row.runtime if host_row.runtime else ''}: {host_row.why}), "
                    f"{self.capacity.source} has {gb(self.capacity.host)}")
        device_row = max(self.rows, key=lambda r: r.device)
        if device_row.device and self.capacity.device is not None and device_row.device > self.capacity.device:
            return (f"needs ~{gb(device_row.device)} GPU memory ({device_row.step}{' in ' + device_row.runtime if device_row.runtime else ''}: {device_row.why}), "
                    f"{self.capacity.source} has {gb(self.capacity.device)}")
        return None


def hessians_bytes(shape: ModelShape, working_copies: int = 0) -> int:
    """GPTQ / SparseGPT: one decoder layer's float32 Hessians at once (llm-compressor's sequential
    pipeline calibrates one layer at a time): six of hidden^2 (q, k, v, o, gate, up), one of
    intermediate^2 (down); plus `working_copies` more of the largest one, which the algorithm
    holds while it factorizes it."""
    return 4 * (6 * shape.hidden**2 + (1 + working_copies) * shape.intermediate**2)


def layer_activations_bytes(ctx: PlanContext) -> int:
    """The calibration windows' inputs and outputs of one layer, as the sequential pipeline keeps them."""
    w = ctx.windows
    return 2 * w.calibration_samples * w.calibration_seq_len * ctx.shape.hidden * 4


# A layer-by-layer technique leaves its weights on disk (one layer in memory at a time) when they
# would take more than this share of the host RAM available; the same rule for llm-compressor's
# disk cache and GPTQModel's offload_to_disk. On a CPU a layer's calibration dwarfs reading and
# writing it (8B GPTQ: ~77 s per layer against ~1 s of disk), so a third already goes to disk and
# leaves the RAM to other steps; on a GPU, where a layer takes seconds, only weights that would
# not fit in host RAM do. Below it the weights stay in memory: no disk to pay.
OFFLOAD_SHARE = {"cpu": 1 / 3, "cuda": 0.8}


def offloads_to_disk(setting: str, weight_bytes: int, available: int, device: str) -> bool:
    """Whether a technique's `offload` setting (auto / disk / memory) puts the weights on disk."""
    if setting == "auto":
        return weight_bytes > OFFLOAD_SHARE[device] * available
    return setting == "disk"


def offloaded_layerwise(note: str, hessians: bool = False, artifact=None, hessian_copies: int = 0) -> callable:
    """A layer-by-layer technique whose weights stay on disk: llm-compressor's sequential pipeline
    onloads one decoder layer at a time from the checkpoint (updated layers are written to a disk
    cache), so the process holds one layer, the embedding or head when that subgraph runs, the
    layer's Hessians and activations; then, at save, the compressed model (`artifact`) as
    transformers gathers it."""

    def footprint(config, ctx: PlanContext) -> Footprint:
        shape = ctx.shape
        layer = shape.linear_params // max(shape.layers, 1) * shape.dtype_bytes
        embedding = shape.vocab * shape.hidden * shape.dtype_bytes
        working = (hessians_bytes(shape, hessian_copies) if hessians else 0) + layer_activations_bytes(ctx)
        size = artifact(config, shape) if artifact else ctx.input_bytes
        why = f"{note}; weights on disk, one layer ({gb(layer)}) in memory at a time, then the {gb(size)} compressed model at save"
        if ctx.device == "cpu":
            return Footprint(host=PROCESS_BYTES + max(layer + embedding + working, size), why=why, artifact=size)
        return Footprint(host=PROCESS_BYTES + max(layer + embedding, size), device=layer + working + forward_bytes(ctx), why=why, artifact=size)

    return footprint


def calibrates_layerwise(note: str, hessians: bool = False, artifact=None, hessian_copies: int = 0) -> callable:
    """A technique that loads the model whole and calibrates it one layer at a time (with one
    layer's Hessians for GPTQ and SparseGPT, and `hessian_copies` working copies of the largest);
    `artifact(config, shape)` is its output's size (default: dense, the input's size)."""

    def footprint(config, ctx: PlanContext) -> Footprint:
        base = loads_model(note=note)(config, ctx)
        more = (hessians_bytes(ctx.shape, hessian_copies) if hessians else 0) + layer_activations_bytes(ctx)
        size = artifact(config, ctx.shape) if artifact else ctx.input_bytes
        if ctx.device == "cpu":
            return Footprint(host=base.host + more, why=base.why, artifact=size)
        # on a GPU the model stays in host RAM and one layer at a time is onloaded
        layer = ctx.shape.linear_params // max(ctx.shape.layers, 1) * ctx.shape.dtype_bytes
        return Footprint(host=PROCESS_BYTES + ctx.shape.bytes_in(ctx.shape.dtype), device=layer + more + forward_bytes(ctx),
                         why=f"{base.why}; one layer on the GPU at a time, the rest in host RAM", artifact=size)

    return footprint


def trains_student(extra_per_param: float = 0.0) -> callable:
    """distill / qat: a float32 student with gradients and AdamW's two moments (16 bytes per
    parameter), the teacher in its dtype, and one batch's activations kept for the backward pass."""

    def footprint(config, ctx: PlanContext) -> Footprint:
        shape = ctx.shape
        state = int((16 + extra_per_param) * shape.params) + shape.bytes_in(shape.dtype)
        tokens = config.batch_size * ctx.windows.calibration_seq_len
        activations = tokens * shape.layers * (12 * shape.hidden + 4 * shape.intermediate) * 4 + tokens * shape.vocab * 4 * 4
        total = state + activations
        why = f"float32 student with gradients and AdamW state ({shape.params / 1e9:.1f} B x 16 bytes) beside the {shape.dtype} teacher, batch {config.batch_size}"
        if ctx.device == "cpu":
            return Footprint(host=PROCESS_BYTES + total, why=why)
        return Footprint(host=PROCESS_BYTES + shape.bytes_in(shape.dtype), device=total, why=why)

    return footprint


# llama.cpp's bits per weight by type (block scales included; the K-quant mixes as llama-quantize
# writes them for Llama bodies)
GGUF_BITS = {
    "f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.69, "q5_k_s": 5.52, "q5_0": 5.5, "q5_1": 6.0,
    "q4_k_m": 4.89, "q4_k_s": 4.58, "q4_0": 4.5, "q4_1": 5.0, "iq4_nl": 4.5, "iq4_xs": 4.25, "q3_k_l": 4.27,
    "q3_k_m": 3.91, "q3_k_s": 3.5, "q2_k": 3.35, "mixed": 5.0,
}


# llama-quantize keeps the token embeddings and output head at q8_0-like precision (q6_k / q8_0)
# in its lower-bit mixes: SmolLM2-135M's q4_0 is 91.7 MB, not the 76 MB of 4.5 bits everywhere.
GGUF_EMBEDDING_BITS = 8.5


def gguf_size(shape: ModelShape, quant_type: str) -> int:
    bits = GGUF_BITS[quant_type]
    return int(shape.linear_params * bits / 8 + shape.embedding_params * max(bits, GGUF_EMBEDDING_BITS) / 8)


def gguf_export_footprint(quant_type: str, imatrix: bool, ctx: PlanContext) -> Footprint:
    """llama.cpp's converter (lazy: about the largest tensor beside the memory-mapped input), then
    llama-quantize, which streams the memory-mapped converted file tensor by tensor: the largest
    tensor in float32 and its work buffer (measured 0.76, 1.34 and 2.15 GB at 135M, 1B and 8B,
    bench/results/scale). llama-imatrix runs the model over the whole mapped file again and again:
    its pages stay resident, so with imatrix the peak is about that file plus the forward pass."""
    shape = ctx.shape
    converted = shape.bytes_in(shape.dtype)
    if imatrix:
        host = PROCESS_BYTES + converted + forward_bytes(ctx, ctx.windows.calibration_seq_len)
        why = f"the {shape.dtype} GGUF ({gb(converted)}) memory-mapped by llama-imatrix"
    else:
        largest = max(shape.vocab, shape.intermediate) * shape.hidden
        host = PROCESS_BYTES + 8 * largest
        why = f"llama-quantize streaming the {shape.dtype} GGUF: its largest tensor ({largest / 1e6:.0f} M weights) in float32, twice"
    return Footprint(host=host, artifact=gguf_size(shape, quant_type), why=why)


def runs_dense(ctx: PlanContext) -> int:
    """A save_pretrained folder loaded for measuring: dense in the target's dtype (compressed
    checkpoints are decompressed at load), plus a perplexity window's float32 logits and the KV
    cache of the latency profile."""
    weights = ctx.shape.bytes_in(ctx.dtype)
    kv = ctx.windows.latency_context * ctx.shape.kv_bytes_per_token * (2 if ctx.dtype == "float32" else 1)
    return weights + forward_bytes(ctx, ctx.windows.eval_seq_len) + kv
