"""Which failures a Prefect task retries: only those that can pass (network, servers), never a
malformed file or a bad setting, which fail the same way every time."""

from __future__ import annotations

_TRANSIENT_MODULES = ("requests", "urllib3", "httpx", "httpcore", "huggingface_hub", "aiohttp", "fsspec")


def is_transient(exc: BaseException) -> bool:
    """A connection, timeout or remote-server error anywhere in the exception's chain."""
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RepositoryNotFoundError | RevisionNotFoundError | GatedRepoError | EntryNotFoundError | LocalEntryNotFoundError):
            return False
        if isinstance(exc, ConnectionError | TimeoutError) or (type(exc).__module__ or "").startswith(_TRANSIENT_MODULES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry the task only if it failed on a transient error."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified, not handled
        return is_transient(exc)
    return False
