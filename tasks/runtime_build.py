"""build_runtime: the target's build of a runtime, compiled for this worker (the recompile).

Compiling is cached on disk under BYOAI_CACHE_DIR by (version, flags, compiler, and the CPU's
features for a native build), not in Prefect's result store: a result cached on one worker must
never hand another worker a build for a different CPU. A cached build returns in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from byoai.log import step_logger
from byoai.tasks.runtimes import RUNTIMES, RuntimeBuild


@task(cache_policy=NO_CACHE)
def build_runtime(runtime: str, config: dict[str, Any], cache_dir: str) -> RuntimeBuild:
    spec = RUNTIMES[runtime]
    build = spec.build(spec.config.model_validate(config), Path(cache_dir).expanduser().resolve())
    step_logger().info("runtime %s: build %s (%s)", runtime, build.key, " ".join(build.flags) or "installed")
    return build
