"""GGUF export: llama.cpp's own converter, then llama.cpp's own quantizer (optionally with its imatrix).

The stage input (a save_pretrained folder: the base model, or a pruned / distilled / quantized
stage) is converted to a GGUF in the checkpoint's own dtype (f32, bf16 or f16: no float32
intermediate for a bf16 model) by `convert_hf_to_gguf.py` from the llama-cpp-python sdist (with
that sdist's gguf-py, never a hand-written writer; it converts lazily, one tensor at a time), then
quantized to `quant_type` by `llama-quantize` compiled from the same source for this worker, which
memory-maps its input. `imatrix: true` first computes llama.cpp's importance matrix
(`llama-imatrix`, memory-mapped too) on the recipe's calibration windows; for a model whose
converted file would not fit in memory beside it, on a q8_0 copy (as llama.cpp's maintainers
advise for big models). A GPTQ or
compressed-tensors input is dequantized by the converter and re-quantized: the facts say so.
The artifact is a folder with `model.gguf` and the tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from byoai.memory import gguf_export_footprint
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError, error_line

# recipe name -> llama-quantize's type name
QUANT_TYPES = {
    "f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q6_k": "Q6_K",
    "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S", "q5_0": "Q5_0", "q5_1": "Q5_1",
    "q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q4_0": "Q4_0", "q4_1": "Q4_1",
    "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS", "q3_k_l": "Q3_K_L", "q3_k_m": "Q3_K_M", "q3_k_s": "Q3_K_S", "q2_k": "Q2_K",
}
QuantType = Literal[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s",
    "q4_0", "q4_1", "iq4_nl", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k",
]
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


class GgufConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    quant_type: QuantType = "q8_0"
    # Quantize with llama.cpp's importance matrix computed on the recipe's calibration windows.
    imatrix: bool = False
    # The llama-cpp-python sdist whose converter and tools write the file.
    version: str = Field(default="0.3.36", pattern=r"^\d+\.\d+\.\d+$")


# the checkpoint's dtype -> the converter's --outtype that keeps it, and its bytes per weight
OUTTYPES = {"float32": ("f32", 4), "bfloat16": ("bf16", 2), "float16": ("f16", 2)}


def convert(model_dir: Path, out_file: Path, src: Path, outtype: str) -> None:
    """llama.cpp's converter, with the sdist's own gguf-py first on the path."""
    llama = src / "vendor" / "llama.cpp"
    env = os.environ | {"PYTHONPATH": str(llama / "gguf-py"), "NO_LOCAL_GGUF": ""}
    done = subprocess.run(
        [sys.executable, str(llama / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out_file), "--outtype", outtype],
        capture_output=True, text=True, env=env,
    )
    if done.returncode != 0:
        raise TechniqueError(f"llama.cpp's converter (convert_hf_to_gguf.py) cannot convert this model: {error_line(done.stderr)}")


def converted_gguf(model_dir: Path, model_sha: str, outtype: str, src: Path, version: str, variants_dir: Path) -> Path:
    """The stage input converted to GGUF in its own dtype, once per (model content, dtype,
    llama.cpp): every type, the imatrix and gguf_mixed of one model read the same file (the
    converter is the slowest step of a small model's export; at 8B it writes 15 GB each time)."""
    from byoai.files import json_sha256

    key = json_sha256({"model": model_sha, "outtype": outtype, "version": version})
    path = variants_dir / "gguf-converted" / f"{key[:24]}-{outtype}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            convert(model_dir, partial, src, outtype)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
    return path


def calibration_text(model_dir: Path, calibration_ids) -> str:
    """The calibration windows as text: llama-imatrix tokenizes its input file itself."""
    from transformers import AutoTokenizer

    from byoai.settings import hf_load_kwargs

    tokenizer = AutoTokenizer.from_pretrained(model_dir, **hf_load_kwargs())
    return "\n".join(tokenizer.decode(row, skip_special_tokens=True) for row in calibration_ids.tolist())


def input_quantization(model_dir: Path) -> str | None:
    config = json.loads((model_dir / "config.json").read_text())
    quantization = config.get("quantization_config")
    return quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else None


def export_gguf(inputs: BuildInputs, quant_type: str, imatrix: bool, version: str, per_tensor=None) -> dict[str, object]:
    """Convert the stage input, optionally compute the imatrix, quantize; return the facts.

    `per_tensor(converted_gguf, bytes_per_weight, work_dir) -> (tensor_type_file, facts)` lets a
    technique choose a type per tensor (llama-quantize's --tensor-type-file) once the converted
    file exists.
    """
    from byoai.files import folder_sha256, json_sha256
    from byoai.hostmem import available_bytes
    from byoai.settings import Settings
    from byoai.tasks.techniques.io import checkpoint_dtype
    from byoai.tasks.runtimes.llama_cpp import GGUF_FILE, LlamaCppConfig, build, gguf_facts, llama_cpp_commit, source, tool

    if not (inputs.model_dir / "config.json").is_file():
        raise TechniqueError(f"gguf converts a save_pretrained folder; {inputs.model_dir} is not one (put gguf last in a chain)")
    cache = Settings().cache_dir.expanduser().resolve()
    src = source(version, cache)
    tools = build(LlamaCppConfig(version=version), cache)  # this worker's native build
    threads = str(os.cpu_count() or 1)
    facts: dict[str, object] = {
        "format": "gguf", "quant_type": quant_type, "imatrix": imatrix,
        "converter": f"convert_hf_to_gguf.py, llama.cpp {llama_cpp_commit(src)} (llama-cpp-python {version} sdist)",
        "llama_cpp_python": version,
    }
    if (method := input_quantization(inputs.model_dir)) is not None:
        facts["requantized_from"] = f"{method}: the converter dequantized the input, llama-quantize re-quantized it"
    out = inputs.out_dir / GGUF_FILE
    outtype, weight_bytes = OUTTYPES[checkpoint_dtype(inputs.model_dir)]
    facts["converted_as"] = outtype
    model_sha = folder_sha256(inputs.model_dir)
    with tempfile.TemporaryDirectory(prefix="byoai-gguf-", dir=inputs.out_dir.parent) as work:
        converted = converted_gguf(inputs.model_dir, model_sha, outtype, src, version, inputs.out_dir.parent)
        args = []
        if imatrix:
            n_samples, seq_len = inputs.calibration_ids.shape
            if n_samples < 2:
                raise TechniqueError("imatrix needs at least 2 calibration windows (calibration.n_samples >= 2)")
            # one importance matrix per (model content, windows, llama.cpp): every type reuses it
            key = json_sha256({"model": model_sha, "windows": inputs.calibration_ids.tolist(), "version": version})
            matrix = inputs.out_dir.parent / "gguf-imatrix" / f"{key[:24]}.gguf"
            if not matrix.is_file():
                text = Path(work) / "calibration.txt"
                text.write_text(calibration_text(inputs.model_dir, inputs.calibration_ids))
                partial = Path(work) / "imatrix.gguf"
                scored = converted
                if converted.stat().st_size > available_bytes() * 0.8:
                    # it would not stay in the page cache: the imatrix of a q8_0 copy is as good
                    scored = Path(work) / "model-q8_0.gguf"
                    tool(tools, "llama-quantize", str(converted), str(scored), "Q8_0", threads)
                facts["imatrix_model"] = "q8_0 copy" if scored != converted else outtype
                tool(tools, "llama-imatrix", "-m", str(scored), "-f", str(text), "-o", str(partial), "-c", str(seq_len),
                     "--chunks", str(n_samples), "-t", threads, "--no-ppl")
                if scored != converted:
                    scored.unlink()
                matrix.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(partial, matrix.with_suffix(f".{os.getpid()}.tmp"))
                matrix.with_suffix(f".{os.getpid()}.tmp").replace(matrix)
            args = ["--imatrix", str(matrix)]
            facts["imatrix_tokens"] = n_samples * seq_len
        if per_tensor is not None:
            type_file, chosen = per_tensor(converted, weight_bytes, Path(work))
            args += ["--tensor-type-file", str(type_file)]
            facts |= chosen
        if quant_type == outtype:
            try:  # the converted file is shared: a hard link where the filesystem allows it
                os.link(converted, out)
            except OSError:
                shutil.copy2(converted, out)
        else:
            tool(tools, "llama-quantize", *args, str(converted), str(out), QUANT_TYPES[quant_type], threads)
    copy_tokenizer(inputs.model_dir, inputs.out_dir)
    return facts | gguf_facts(out, tools)


def copy_tokenizer(model_dir: Path, out_dir: Path) -> None:
    """A GGUF artifact keeps the tokenizer files beside model.gguf (lm-eval and tests read them)."""
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)


def run(inputs: BuildInputs) -> BuildResult:
    config: GgufConfig = inputs.config
    facts = export_gguf(inputs, config.quant_type, config.imatrix, config.version)
    return BuildResult(model_dir=inputs.out_dir, facts=facts, format="gguf")


TECHNIQUE = Technique(
    name="gguf",
    summary="GGUF export: llama.cpp's converter + llama-quantize (q8_0 ... q2_k, iq4_nl), optional imatrix",
    config=GgufConfig,
    footprint=lambda config, ctx: gguf_export_footprint(config.quant_type, config.imatrix, ctx),
    run=run,
    devices=frozenset({"cpu", "cuda"}),
    needs_calibration=True,
    output_format="gguf",
)
