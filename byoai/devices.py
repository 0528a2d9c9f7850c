"""What this worker can run, and how to describe it next to the numbers measured on it."""

from __future__ import annotations

import platform
from functools import cache


def unavailable_reason(device: str) -> str | None:
    """None when `device` can run here; otherwise why not, in words a user can act on."""
    import torch

    if device == "cpu":
        return None
    if device == "cuda":
        if not torch.cuda.is_available():
            return (
                "needs a CUDA GPU, and this worker has none (torch.cuda.is_available() is False, "
                f"torch {torch.__version__}); run this target on a GPU worker"
            )
        return None
    return f"unknown device '{device}'"


@cache
def describe(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
