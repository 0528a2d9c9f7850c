"""Runtime `llama_cpp`: GGUF files run by llama.cpp, compiled for the target from PyPI's sdist.

The recompile: a target profile gives the CMake flags (`runtimes: {llama_cpp: {cmake_args:
[-DGGML_NATIVE=ON]}}`); `build` compiles llama-cpp-python from its sdist with them, once per
(version, flags, the fixed flags below, compiler, and the CPU's features when the build is
native), into BYOAI_CACHE_DIR/runtimes/, never a prebuilt binary. The same build also compiles
llama.cpp's own `llama-quantize`, `llama-imatrix` and `llama-bench` (the `gguf` stage uses them)
and `llama-server` (tasks.serving measures and `byoai serve` runs it) from the vendored source. A native build records the CPU it was compiled for and is never run on another.

Measurements run in a worker process with that build first on sys.path (byoai.worker),
through llama.cpp's C API: the same token ids as every runtime, batched decode of several
sequences for batch > 1.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from byoai.files import atomic_folder, json_sha256
from byoai.settings import hf_load_kwargs
from byoai.tasks.runtimes.base import MeasureRequest, Runtime, RuntimeBuild, RuntimeUnavailable

PACKAGE = "llama-cpp-python"
DEFAULT_VERSION = "0.3.36"
GGUF_FILE = "model.gguf"
SERVER = "llama-server"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-bench", SERVER)
_MARKER = ".byoai-runtime.json"
# Always added: the tools the gguf stage and serving need, nothing that downloads (the server's
# web UI: LLAMA_USE_PREBUILT_UI fetches it from the Hugging Face hub at build time, LLAMA_BUILD_UI
# runs npm) or that byoai does not use (llava, examples, tests). Part of the build's key: a
# build made with other fixed flags (one without the server) is rebuilt, not reused.
_FIXED_ARGS = (
    "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
# Compiler flags of every x86 build: no AMX. ggml's AMX kernels crash (a general-protection fault
# in ldtilecfg on the first batched matmul: the tile config it builds on the stack is optimized
# away; llama.cpp issue 20824, fix still open as PR 26954) on hosts that have AMX, this project's
# 2-core CI machines among them; -march=native would compile them in. An explicit
# -DGGML_AMX_*=ON in a profile's cmake_args comes later on the command line and still wins.
_X86_COMPILER_FLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")


def compiler_flags() -> tuple[str, ...]:
    return _X86_COMPILER_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else ()


def profile_cmake_args(recorded: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A target profile's cmake_args from the flags a build recorded (RuntimeBuild.flags, the
    `runtime.flags` param of a run): less those every build adds."""
    return tuple(flag for flag in recorded if flag not in {*_FIXED_ARGS, *_X86_COMPILER_FLAGS})


# CMake ISA switch -> the /proc/cpuinfo flag a CPU needs to run what it compiles
_ISA_FLAGS = {
    "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2",
    "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16",
    "GGML_AMX_TILE": "amx_tile", "GGML_AMX_INT8": "amx_int8", "GGML_AMX_BF16": "amx_bf16",
}


class LlamaCppConfig(BaseModel):
    """How a target builds llama.cpp: the llama-cpp-python version and CMake flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(default=DEFAULT_VERSION, pattern=r"^\d+\.\d+\.\d+$")
    # e.g. [-DGGML_NATIVE=ON] (this CPU), [-DGGML_NATIVE=OFF, -DGGML_AVX2=ON, ...] (a portable
    # build), [-DGGML_CUDA=ON, -DCMAKE_CUDA_ARCHITECTURES=90] (H100)
    cmake_args: tuple[str, ...] = ("-DGGML_NATIVE=ON",)

    def switch(self, name: str) -> bool | None:
        """The value a -D<name>=ON/OFF flag sets, or None when the flags leave it to CMake."""
        value = None
        for arg in self.cmake_args:
            key, _, setting = arg.removeprefix("-D").partition("=")
            if key.split(":")[0] == name:
                value = setting.upper() in {"ON", "1", "TRUE", "YES"}
        return value

    @property
    def native(self) -> bool:
        # GGML_NATIVE is on unless switched off (llama.cpp's default outside cross-compiles)
        return self.switch("GGML_NATIVE") is not False


# ---------------------------------------------------------------- the host
@cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            line = next(line for line in handle if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


@cache
def compiler() -> str:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
            return out.splitlines()[0] if out else cc
    return ""


def host_key(config: LlamaCppConfig) -> str:
    """What else a build depends on: the compiler, and the CPU's features for a native build."""
    return json_sha256({"compiler": compiler(), "cpu": sorted(cpu_flags()) if config.native else None})


def _has_cuda_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def unavailable_reason(config: LlamaCppConfig, device: str) -> str | None:
    """Why this worker cannot build or run the profile's llama.cpp, or None."""
    missing = [tool for tool in ("cmake", "ninja") if not shutil.which(tool)]
    if not compiler():
        missing.append("a C/C++ compiler")
    if missing:
        return f"compiling llama.cpp needs {', '.join(missing)} on this worker (infra/install.sh lists them)"
    if config.switch("GGML_CUDA"):
        if not _has_cuda_gpu():
            return "its llama.cpp build asks for CUDA (-DGGML_CUDA=ON), and this worker has no NVIDIA GPU (nvidia-smi finds none)"
        if not (shutil.which("nvcc") or os.environ.get("CUDACXX")):
            return "its llama.cpp build asks for CUDA (-DGGML_CUDA=ON), and this worker has no CUDA compiler (nvcc; use the CUDA devel image, infra/worker.Dockerfile)"
    flags = cpu_flags()
    for switch, flag in _ISA_FLAGS.items():
        if config.switch(switch) and flags and flag not in flags:
            return f"its llama.cpp build asks for {switch.removeprefix('GGML_')} (-D{switch}=ON), and this CPU lacks it (no '{flag}' in /proc/cpuinfo)"
    if device == "cuda" and not config.switch("GGML_CUDA"):
        return "a cuda target needs a CUDA build of llama.cpp: add -DGGML_CUDA=ON to its cmake_args"
    return None


# ---------------------------------------------------------------- the build
def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]


@contextmanager
def _locked(path: Path):
    """One process builds a given folder at a time; the others wait and then find it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def source(version: str, cache_dir: Path) -> Path:
    """The unpacked sdist of llama-cpp-python `version` (downloaded once from the package index)."""
    folder = cache_dir / "sources" / f"{PACKAGE}-{version}"
    if (folder / "vendor" / "llama.cpp").is_dir():
        return folder
    with _locked(folder):
        if (folder / "vendor" / "llama.cpp").is_dir():
            return folder
        with atomic_folder(cache_dir / "sources" / f"sdist-{version}") as download:
            result = subprocess.run(
                _pip("download", "--no-deps", "--no-binary", ":all:", f"{PACKAGE}=={version}", "-d", str(download)),
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                raise RuntimeUnavailable(f"cannot get the {PACKAGE} {version} sdist: {result.stderr.strip()[-800:]}")
            archive = next(download.glob("*.tar.gz"))
            with atomic_folder(folder) as tmp, tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
                (inner,) = list(tmp.iterdir())
                for item in inner.iterdir():
                    item.rename(tmp / item.name)
                inner.rmdir()
    return folder


def build_dir(config: LlamaCppConfig, cache_dir: Path) -> Path:
    key = json_sha256({"version": config.version, "cmake_args": config.cmake_args, "fixed": _FIXED_ARGS,
                       "compiler_flags": compiler_flags(), "host": host_key(config)})
    return cache_dir / "runtimes" / f"llama_cpp-{config.version}-{key[:16]}"


def build(config: LlamaCppConfig, cache_dir: Path) -> RuntimeBuild:
    """Compile llama-cpp-python (and llama.cpp's tools) from the sdist with the profile's flags.

    Kept under cache_dir: wheel/ (the wheel built), site/ (it, installed), bin/ (the tools and
    the shared libraries they load). Later calls with the same key return the recorded build.
    """
    folder = build_dir(config, cache_dir)
    marker = folder / _MARKER
    if marker.is_file():
        return RuntimeBuild.model_validate_json(marker.read_text())
    reason = unavailable_reason(config, "cuda" if config.switch("GGML_CUDA") else "cpu")
    if reason:
        raise RuntimeUnavailable(reason)
    src = source(config.version, cache_dir)
    with _locked(folder):
        if marker.is_file():
            return RuntimeBuild.model_validate_json(marker.read_text())
        with atomic_folder(folder) as tmp:
            flags = (*config.cmake_args, *_FIXED_ARGS)
            env = os.environ | {"CMAKE_ARGS": " ".join(flags), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
            env |= {name: " ".join((os.environ.get(name, ""), *compiler_flags())).strip() for name in ("CFLAGS", "CXXFLAGS")}
            env.pop("SOURCE_DATE_EPOCH", None)  # it switches GGML_NATIVE off
            started = time.perf_counter()
            log = tmp / "build.log"
            with open(log, "w") as out:
                result = subprocess.run(
                    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"),
                         f"--config-settings=build-dir={tmp / 'cmake'}", str(src)),
                    stdout=out, stderr=subprocess.STDOUT, env=env,
                )
            if result.returncode != 0:
                tail = log.read_text()[-3000:]
                raise RuntimeUnavailable(f"compiling {PACKAGE} {config.version} with {' '.join(flags)} failed:\n{tail}")
            build_s = time.perf_counter() - started
            wheel = next((tmp / "wheel").glob("*.whl"))
            subprocess.run(_pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheel)), check=True, capture_output=True)
            (tmp / "bin").mkdir()
            for item in (tmp / "cmake" / "bin").iterdir():
                if item.name in TOOLS or ".so" in item.name:
                    shutil.copy2(item, tmp / "bin" / item.name, follow_symlinks=False)
            shutil.rmtree(tmp / "cmake")
            info = subprocess.run(
                [sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(tmp / "site")}, check=True,
            ).stdout.strip()
            server = subprocess.run(
                [str(tmp / "bin" / SERVER), "--version"], capture_output=True, text=True, timeout=60,
                env=os.environ | {"LD_LIBRARY_PATH": str(tmp / "bin")},
            )
            record = RuntimeBuild(
                runtime="llama_cpp", key=folder.name, path=str(folder), version=config.version, flags=(*flags, *compiler_flags()),
                compiler=compiler(), system_info=info, build_s=round(build_s, 1),
                server_version=" ".join((server.stdout + server.stderr).split())[:300],
                native_cpu=json_sha256(sorted(cpu_flags()))[:16] if config.native else None,
            )
            (tmp / _MARKER).write_text(record.model_dump_json(indent=2))
    return record


def check_runs_here(build: RuntimeBuild) -> None:
    """A native build runs only on a CPU with the features it was compiled for."""
    if build.native_cpu and build.native_cpu != json_sha256(sorted(cpu_flags()))[:16]:
        raise RuntimeUnavailable(
            f"llama.cpp build {build.key} was compiled natively for another CPU (features {build.native_cpu}); "
            "it would die with 'Illegal instruction' here: let this worker compile its own"
        )


def tool_env(build: RuntimeBuild) -> dict[str, str]:
    """The environment a tool of the build runs in: the build's shared libraries found first."""
    bin_dir = Path(build.path) / "bin"
    return os.environ | {"LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(bin_dir), os.environ.get("LD_LIBRARY_PATH")]))}


def tool(build: RuntimeBuild, name: str, *args: str, timeout: float | None = None) -> str:
    """Run one of llama.cpp's tools from the build; return its output, raise with it on failure."""
    check_runs_here(build)
    bin_dir = Path(build.path) / "bin"
    result = subprocess.run([str(bin_dir / name), *args], capture_output=True, text=True, timeout=timeout, env=tool_env(build))
    if result.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout + result.stderr


def python_env(build: RuntimeBuild) -> dict[str, str]:
    """Environment for a worker process that imports this build's llama_cpp."""
    paths = [str(Path(build.path) / "site"), os.environ.get("PYTHONPATH", "")]
    return os.environ | {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def llama_cpp_commit(src: Path) -> str:
    """The vendored llama.cpp's commit: the newest one the sdist's changelog says it moved to."""
    changelog = src / "CHANGELOG.md"
    match = re.search(r"llama\.cpp@([0-9a-f]{7,40})", changelog.read_text()) if changelog.is_file() else None
    return match.group(1) if match else "unknown"


# ---------------------------------------------------------------- the session
class LlamaCppSession:
    """A GGUF loaded through llama.cpp's C API (llama-cpp-python's bindings), one process."""

    def __init__(self, request: MeasureRequest):
        import llama_cpp

        from byoai import devices

        check_runs_here(request.build)
        self.lib = llama_cpp
        self.device = request.device
        self.threads = request.threads or os.cpu_count() or 1
        latency = request.latency
        # one context sized for the whole latency profile: every batch size's sequences side by side
        self.latency_ctx = max(
            max([latency["prompt_tokens"], *latency["prompt_lengths"]]),
            max([1, *latency["batch_sizes"]]) * (latency["prompt_tokens"] + latency["new_tokens"]),
        ) + 8
        self.latency_seqs = max([1, *latency["batch_sizes"]])
        self.tokenizer_path = request.artifact_path
        llama_cpp.llama_backend_init()
        started = time.perf_counter()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 999 if self.device == "cuda" else 0
        self.model = llama_cpp.llama_model_load_from_file(str(Path(request.artifact_path) / GGUF_FILE).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {Path(request.artifact_path) / GGUF_FILE}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.ctx = self.batch = None
        self.shape = (0, 0)
        self._context(self.latency_ctx, self.latency_seqs)
        self.load_s = time.perf_counter() - started
        info = llama_cpp.llama_print_system_info().decode()
        self.description = f"{devices.describe(self.device)}; llama.cpp {request.build.version} ({request.build.key}): {info}"

    def _context(self, n_ctx: int, n_seqs: int) -> None:
        """A context holding n_ctx tokens over n_seqs sequences (kept while it is big enough)."""
        lib = self.lib
        if self.ctx is not None and self.shape[0] >= n_ctx and self.shape[1] >= n_seqs:
            return
        if self.ctx is not None:
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ctx, min(n_ctx, 512)
        params.n_seq_max, params.kv_unified = n_seqs, True
        params.n_threads = params.n_threads_batch = self.threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.batch = lib.llama_batch_init(n_ctx, 0, n_seqs)
        self.shape = (n_ctx, n_seqs)

    def _decode(self, tokens, positions, seqs, logits) -> None:
        import numpy as np

        lib, batch, n = self.lib, self.batch, len(tokens)
        batch.n_tokens = n
        np.ctypeslib.as_array(batch.token, shape=(n,))[:] = tokens
        np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = positions
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
        np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = logits
        for i, seq in enumerate(seqs):
            batch.seq_id[i][0] = seq
        status = lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _logits(self, rows: int):
        import numpy as np
        import torch

        return torch.from_numpy(np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(rows, self.n_vocab)).copy())

    def sequence_logits(self, ids: list[int]):
        """Logits [len(ids), vocab] of one sequence decoded from an empty state."""
        n = len(ids)
        self._context(max(n, self.latency_ctx), self.latency_seqs)
        self._clear()
        self._decode(ids, range(n), [0] * n, [1] * n)
        return self._logits(n)

    def logprobs(self, ids: list[int]):
        """log-softmax rows [len(ids), vocab] (lm-eval)."""
        import torch

        return torch.log_softmax(self.sequence_logits(ids).double(), dim=-1)

    def nll(self, window) -> float:
        import torch

        logits = self.sequence_logits(window.tolist())
        return torch.nn.functional.cross_entropy(logits[:-1].float(), window[1:], reduction="sum").item()

    def prefill(self, prompts):
        batch, length = prompts.shape
        self._clear()
        ids = prompts.flatten().tolist()
        last = [0] * (length - 1) + [1]
        self._decode(ids, list(range(length)) * batch, [s for s in range(batch) for _ in range(length)], last * batch)
        return {"tokens": self._logits(batch).argmax(-1).tolist(), "pos": length}

    def decode(self, state, steps: int) -> None:
        tokens, pos = state["tokens"], state["pos"]
        batch = len(tokens)
        for step in range(steps):
            self._decode(tokens, [pos + step] * batch, range(batch), [1] * batch)
            tokens = self._logits(batch).argmax(-1).tolist()

    def sync(self) -> None:
        self.lib.llama_synchronize(self.ctx)

    def memory(self) -> dict[str, float]:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"weights_mb": self.lib.llama_model_size(self.model) / 1e6, "peak_mem_mb": peak_kb * 1024 / 1e6}

    def lm_eval_model(self, spec):
        from transformers import AutoTokenizer

        from byoai.tasks.lm_eval_tasks import LogitsLM

        return LogitsLM(self.logprobs, AutoTokenizer.from_pretrained(self.tokenizer_path, **hf_load_kwargs()), max_length=2048)


def _bound(library: str, signatures: list[tuple[str, object, list]]):
    """A shared library of a build, with the result and argument types of the functions byoai calls."""
    import ctypes

    lib = ctypes.CDLL(library)
    for name, result, args in signatures:
        function = getattr(lib, name)
        function.restype, function.argtypes = result, args
    return lib


@cache
def _ggml_gguf(library: str):
    """ggml's own GGUF reader (gguf.h) in a build's libggml-base: it parses the header in C.
    gguf-py's GGUFReader parses every vocabulary entry in Python (3.4 s for SmolLM2's 49k tokens,
    per file read; 16 ms here), and byoai reads each GGUF it builds."""
    import ctypes

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib = _bound(library, [
        ("gguf_init_from_file", ctypes.c_void_p, [ctypes.c_char_p, InitParams]),
        ("gguf_get_n_tensors", ctypes.c_int64, [ctypes.c_void_p]),
        ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        ("gguf_free", None, [ctypes.c_void_p]),
        ("ggml_type_name", ctypes.c_char_p, [ctypes.c_int]),
        ("ggml_type_size", ctypes.c_size_t, [ctypes.c_int]),
        ("ggml_blck_size", ctypes.c_int64, [ctypes.c_int]),
    ])
    return lib, InitParams


@cache
def _ggml_quants(library: str):
    """ggml's quantizer (ggml_quantize_chunk, what llama-quantize calls) and each type's
    dequantizer (its traits' to_float) in a build's libggml-base."""
    import ctypes

    class TypeTraits(ctypes.Structure):
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                    ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]

    lib = _bound(library, [
        ("ggml_quantize_chunk", ctypes.c_size_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]),
        ("ggml_row_size", ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
        ("ggml_get_type_traits", ctypes.POINTER(TypeTraits), [ctypes.c_int]),
    ])
    return lib, ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def ggml_roundtrip(build: RuntimeBuild, weight, quant_type: str):
    """A float32 array [rows, row length] as llama.cpp stores it in `quant_type` (no imatrix):
    quantized and dequantized by the build's ggml, so the same rounding as the file llama-quantize
    writes. gguf-py's numpy reference gives the same values (bit for bit on q4_0 … q8_0) in 3–10 ×
    the time per tensor (about 20 s of SmolLM2's gguf_mixed build, from those timings)."""
    import numpy as np
    from gguf import GGMLQuantizationType

    lib, to_float_type = _ggml_quants(str(Path(build.path) / "bin" / "libggml-base.so"))
    kind = GGMLQuantizationType[quant_type.upper()].value
    rows = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, weight.shape[-1])
    packed = np.empty(lib.ggml_row_size(kind, rows.shape[1]) * rows.shape[0], dtype=np.uint8)
    lib.ggml_quantize_chunk(kind, rows.ctypes.data, packed.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    out = np.empty_like(rows)
    to_float_type(lib.ggml_get_type_traits(kind).contents.to_float)(packed.ctypes.data, out.ctypes.data, rows.size)
    return out.reshape(weight.shape)


def _tensor_infos(path: Path, build: RuntimeBuild | None) -> list[tuple[str, int, int]]:
    """(type name as gguf-py spells it, bytes, elements) per tensor: by ggml's reader where the
    step has the llama.cpp build that wrote the file (a GGUF export), else by gguf-py's reader
    (the recipe's input file, parsed once per process for the plan too; AutoRound's own writer)."""
    if build is None:
        from byoai.files import gguf_reader

        return [(t.tensor_type.name, int(t.n_bytes), int(t.n_elements)) for t in gguf_reader(path).tensors]
    lib, init_params = _ggml_gguf(str(Path(build.path) / "bin" / "libggml-base.so"))
    context = lib.gguf_init_from_file(os.fsencode(path), init_params(True, None))
    if not context:
        raise ValueError(f"{path}: ggml cannot read it as a GGUF file")
    try:
        infos = []
        for i in range(lib.gguf_get_n_tensors(context)):
            kind, size = lib.gguf_get_tensor_type(context, i), lib.gguf_get_tensor_size(context, i)
            # ggml's q6_K, bf16 are gguf-py's Q6_K, BF16
            infos.append((lib.ggml_type_name(kind).decode().upper(), size, size * lib.ggml_blck_size(kind) // lib.ggml_type_size(kind)))
        return infos
    finally:
        lib.gguf_free(context)


def gguf_facts(path: Path, build: RuntimeBuild | None = None) -> dict[str, object]:
    """Tensor types actually written (type -> count), effective bits per weight, file size."""
    from collections import Counter

    types, bits, weights = Counter(), 0, 0
    for name, size, elements in _tensor_infos(path, build):
        types[name] += 1
        bits += size * 8
        weights += elements
    return {
        "tensor_types": json.dumps(dict(sorted(types.items()))),
        "bits_per_weight": round(bits / weights, 3) if weights else 0.0,
        "gguf_mb": round(path.stat().st_size / 1e6, 3),
    }


def footprint(ctx, artifact_bytes: int):
    """The file memory-mapped (its pages resident once read), the KV cache and logits of the
    perplexity context (logits_all), and the latency profile's context; with a serving profile,
    llama-server's slots (one process after the other: the larger context counts)."""
    from byoai.memory import Footprint

    w = ctx.windows
    context = max(w.eval_seq_len, w.latency_context, w.serving_context)
    buffers = context * ctx.shape.kv_bytes_per_token + w.eval_seq_len * ctx.shape.vocab * 4 * 2
    held = "llama-server's slots" if w.serving_context > max(w.eval_seq_len, w.latency_context) else "the measurement"
    why = f"the GGUF file memory-mapped ({artifact_bytes / 1e9:.1f} GB), KV cache and logits of {context} tokens ({held})"
    if w.draft_share:  # the server of a speculative pair maps a draft and holds its KV cache too
        draft = int(artifact_bytes * w.draft_share)
        buffers += int(w.serving_context * ctx.shape.kv_bytes_per_token * w.draft_share)
        artifact_bytes += draft
        why += f", a draft up to {draft / 1e9:.1f} GB beside it"
    if ctx.device == "cpu":
        return Footprint(host=WORKER_BYTES + artifact_bytes + buffers, why=why)
    return Footprint(host=WORKER_BYTES + w.eval_seq_len * ctx.shape.vocab * 4 * 2, device=artifact_bytes + buffers, why=why)


# the measuring worker before it maps a model: Python, the bindings, tokenizers
WORKER_BYTES = int(0.45e9)


def server_command(build: RuntimeBuild, spec) -> tuple[list[str], dict[str, str]]:
    """llama-server on one GGUF (tasks.serving.ServerSpec): continuous batching over one slot per
    user, each slot's context its prompt plus its new tokens (-c is shared among the slots),
    prompt caching, Prometheus /metrics, no web UI."""
    check_runs_here(build)
    argv = [
        str(Path(build.path) / "bin" / SERVER), "-m", str(spec.model), "-t", str(spec.threads), "-tb", str(spec.threads),
        "-np", str(spec.slots), "-c", str(spec.slots * spec.slot_context), "-ngl", "999" if spec.device == "cuda" else "0",
        "--metrics", "--no-webui", "--cache-prompt", *spec.extra_args,
    ]
    return argv, tool_env(build)


RUNTIME = Runtime(
    name="llama_cpp",
    summary="llama.cpp compiled for the target from the llama-cpp-python sdist (CMake flags from the profile); runs GGUF",
    formats=frozenset({"gguf"}),
    devices=frozenset({"cpu", "cuda"}),
    config=LlamaCppConfig,
    unavailable_reason=unavailable_reason,
    build=build,
    open_session=LlamaCppSession,
    worker_env=python_env,
    footprint=footprint,
    server_command=server_command,
    served_file=GGUF_FILE,
)
