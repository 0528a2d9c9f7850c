"""Where byoai keeps its state. One settings model, read from the environment (BYOAI_*)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BYOAI_", extra="ignore")

    # Per-project state: MLflow store (default), built variants, Prefect task results.
    home: Path = Path(".byoai")
    # Per-machine cache shared by projects: base models materialized from GGUF or the hub.
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "byoai")
    tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("BYOAI_TRACKING_URI", "MLFLOW_TRACKING_URI")
    )

    # Override the recipe's execution block on this machine (e.g. more workers on a big box).
    runner: str | None = None
    max_workers: int | None = None
    # How long `optimize` waits for a run it dispatched to another target's work pool (a worker
    # that died leaves its run pending): past it, that target's variants are recorded as failed.
    dispatch_timeout_s: float = Field(default=6 * 3600, gt=0)
    # Whether transformers may run a model's own modeling code (config.json `auto_map`). Off unless
    # the recipe's model says `trust_remote_code: true`: see `remote_code_policy`.
    trust_remote_code: bool = False
    # Registered versions hold a copy of the artifact in the MLflow store (false: they point at
    # the built folder instead, e.g. for multi-GB benchmark artifacts; `byoai run --no-register`).
    register_copies: bool = True

    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    def tracking(self, override: str | None = None) -> str:
        """CLI flag, then MLFLOW_TRACKING_URI / BYOAI_TRACKING_URI, then SQLite under home."""
        if override:
            return override
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{self.resolved_home() / 'mlflow.db'}"

    def default_artifact_root(self) -> Path:
        return self.resolved_home() / "mlartifacts"

    def variants_dir(self) -> Path:
        return self.resolved_home() / "variants"

    def data_dir(self) -> Path:
        return self.resolved_home() / "data"

    def logs_dir(self) -> Path:
        return self.resolved_home() / "logs"

    def results_dir(self) -> Path:
        return self.resolved_home() / "prefect-results"

    def models_dir(self) -> Path:
        return self.cache_dir.expanduser().resolve() / "models"


def hf_load_kwargs() -> dict:
    """Passed to every from_pretrained: explicit, so transformers never prompts (a worker has no tty)."""
    return {"trust_remote_code": Settings().trust_remote_code}


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set these environment variables for a block, then restore what was there.

    For settings that must reach worker processes (they inherit the environment) but must not
    outlive the command that set them when it runs in-process (tests, `byoai auto` calling run).
    """
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def remote_code_policy(allowed: bool) -> AbstractContextManager[None]:
    """The recipe's `trust_remote_code` for this process and the worker processes it starts.

    Set in the environment (not passed to each task) because the loads it governs sit deep in
    techniques and runtimes, and process-based task runners and runtime workers inherit it.
    """
    return environment(BYOAI_TRUST_REMOTE_CODE="true" if allowed else "false")
