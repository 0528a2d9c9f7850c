"""Content hashes, all-or-nothing folder writes and GGUF headers of model files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """Hash of every file's relative path and content; byoai's own marker files are left out."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".byoai")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def gguf_reader(path: Path | str):
    """gguf-py's GGUFReader of a file, parsed once per file content in this process: it parses every
    vocabulary entry in Python (3 s for SmolLM2's 49k tokens), and one run reads its input file's
    header for the memory plan, the input's facts and each model card's license. One file is kept
    (a 128k vocabulary parses into some 100 MB of small arrays)."""
    stat = Path(path).stat()
    return _parsed_gguf(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=1)
def _parsed_gguf(path: str, mtime_ns: int, size: int):
    from gguf.gguf_reader import GGUFReader  # the class itself, whatever gguf_parsed_once put in its place

    return GGUFReader(path)


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within it, transformers' GGUF loading reads each file through gguf_reader: it builds a
    GGUFReader of the file several times (config, tokenizer, weights), each parsing the vocabulary
    in Python (materializing the embedded SmolLM2: 26.3 s, 18.6 s within this; session 15).
    transformers imports the name from the `gguf` package when it loads
    (transformers.modeling_gguf_pytorch_utils), so it finds this one."""
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = lambda path, mode="r": gguf_reader(path) if mode == "r" else original(path, mode)
    try:
        yield
    finally:
        gguf.GGUFReader = original


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".byoai"))


def json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; it becomes `final` only if the block succeeds.

    A crash or an exception leaves no half-written folder where a later run would trust it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # another process finished the same content-addressed build first
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
