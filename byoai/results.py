"""Persisted task results are JSON, and only JSON written by byoai is ever read back.

Prefect keeps each cached task result as a record whose metadata names the serializer that reads
it; a pickle record would execute code when read. byoai writes every result with `SERIALIZER`
(Prefect's JSON serializer; objects rebuilt only as byoai's own pydantic models) into `JsonResults`
storage, which reads back a record only when it was written that way: a pickle, a tampered or a
truncated file reads as missing, so that step is recomputed and its record rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer, prefect_json_object_decoder

DECODER = "byoai.results.decode"


def decode(value: dict[str, Any]) -> Any:
    """json object_hook: rebuild byoai's result models (and exceptions); refuse any other class."""
    name = value.get("__class__")
    if name is not None and not name.startswith("byoai."):
        raise ValueError(f"a persisted result names the class {name!r}: byoai reads back only its own result types")
    return prefect_json_object_decoder(value)


SERIALIZER = JSONSerializer(object_decoder=DECODER)


def checked(content: bytes) -> bytes:
    """The stored bytes, if they are JSON and (for a record) byoai's JSON serializer wrote them;
    ValueError otherwise. (A flow run's result is stored bare: its metadata lives in the API.)"""
    record = json.loads(content)
    if isinstance(record, dict) and "metadata" in record:
        serializer = record["metadata"].get("serializer") or {}
        if serializer.get("type") != "json" or serializer.get("object_decoder") != DECODER:
            raise ValueError(f"not a byoai JSON result record (serializer {serializer.get('type')!r})")
    return content


class JsonResults(LocalFileSystem):
    """Local result storage that reads back only byoai's JSON records (see the module's doc)."""

    _block_type_name = "byoai JSON results"

    async def aread_path(self, path: str) -> bytes:
        return checked(await super().aread_path(path))

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return checked(super().read_path(path, _sync=True))


def result_options(folder: Path) -> dict[str, Any]:
    """with_options(...) for a flow whose task results persist as JSON in `folder`. Prefect wants
    the storage block saved on its server; the name follows the folder, so runs share it."""
    import hashlib

    block = JsonResults(basepath=str(folder))
    block.save(f"byoai-results-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}", overwrite=True)
    return {"result_storage": block, "result_serializer": SERIALIZER}
