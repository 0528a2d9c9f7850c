"""What memory this worker has: RAM available to this process within its cgroup (v1 or v2), free
GPU memory, and the cgroup's count of out-of-memory kills (which tells a kill by the kernel's OOM
killer from any other SIGKILL).

`BYOAI_MEMORY_GB` / `BYOAI_DEVICE_MEMORY_GB` replace what is measured (a worker that shares its
machine with other work, or a test that wants a small machine).
"""

from __future__ import annotations

import os
from pathlib import Path

_V2_ROOT = Path("/sys/fs/cgroup")
_V1_ROOT = Path("/sys/fs/cgroup/memory")
# cgroup v1 writes "no limit" as the largest page-aligned 64-bit number
_UNLIMITED = 1 << 60


def _own_groups() -> dict[str, str]:
    """controller list -> this process's cgroup path (/proc/self/cgroup)."""
    groups = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            groups[controllers] = path
    except (OSError, ValueError):
        pass
    return groups


def memory_cgroup() -> tuple[str, Path] | None:
    """("v1" | "v2", folder) of the memory cgroup this process is in, if one is mounted."""
    groups = _own_groups()
    v1 = next((path for controllers, path in groups.items() if "memory" in controllers.split(",")), None)
    if v1 is not None and _V1_ROOT.is_dir():
        for folder in (_V1_ROOT / v1.lstrip("/"), _V1_ROOT):  # inside a container the group is the mount
            if (folder / "memory.limit_in_bytes").is_file():
                return "v1", folder
    if "" in groups and (_V2_ROOT / "cgroup.controllers").is_file():
        for folder in (_V2_ROOT / groups[""].lstrip("/"), _V2_ROOT):
            if (folder / "memory.max").is_file():
                return "v2", folder
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup, or None when it has none."""
    found = memory_cgroup()
    if found is None:
        return None
    version, folder = found
    limit = _read_int(folder / ("memory.limit_in_bytes" if version == "v1" else "memory.max"))
    return limit if limit is not None and limit < _UNLIMITED else None


def _cgroup_usage_bytes() -> int | None:
    found = memory_cgroup()
    if found is None:
        return None
    version, folder = found
    usage = _read_int(folder / ("memory.usage_in_bytes" if version == "v1" else "memory.current"))
    if usage is None:
        return None
    # page cache counts toward usage but is reclaimed before anything is killed
    stat = _stat(folder / "memory.stat")
    return max(0, usage - stat.get("total_inactive_file" if version == "v1" else "inactive_file", 0))


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def oom_kills() -> int:
    """How many processes the kernel's OOM killer has killed in this cgroup so far (0 if unknown)."""
    found = memory_cgroup()
    if found is None:
        return 0
    version, folder = found
    return _stat(folder / ("memory.oom_control" if version == "v1" else "memory.events")).get("oom_kill", 0)


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def available_bytes() -> int:
    """RAM this worker can still use: the machine's available memory, or the room left under the
    cgroup's limit when that is less (BYOAI_MEMORY_GB overrides both)."""
    if override := os.environ.get("BYOAI_MEMORY_GB"):
        return int(float(override) * 1e9)
    available = _meminfo_available()
    limit, usage = cgroup_limit_bytes(), _cgroup_usage_bytes()
    if limit is not None and usage is not None:
        available = min(available, limit - usage)
    return available


def limit_bytes() -> int:
    """The memory this worker's processes may use at most, as the kernel enforces it: the cgroup
    limit, else the machine's RAM (never BYOAI_MEMORY_GB: this explains kills)."""
    limit = cgroup_limit_bytes()
    if limit is not None:
        return limit
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_free_bytes() -> int | None:
    """Free memory of the first CUDA device, or None without one (BYOAI_DEVICE_MEMORY_GB overrides)."""
    if override := os.environ.get("BYOAI_DEVICE_MEMORY_GB"):
        return int(float(override) * 1e9)
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" for planning
        return None
