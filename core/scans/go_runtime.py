"""Go runtime settings of Trivy processes: GOGC and GOMEMLIMIT.

Trivy allocates heavily while it starts and while it analyses layers, and with
Go's default GOGC of 100 the garbage collector runs many times during a short
scan. With GOGC=400, Trivy v0.74.0 scanned the 12-finding fixture image in
76 ms instead of 85 ms (medians of 25 interleaved runs of each on a 2-core machine),
for 3 MB more peak memory; BENCHMARKS.md has the benchmark's figures. The larger heap is bounded by GOMEMLIMIT, a soft limit
that makes the collector run sooner as the process nears it.
"""

from __future__ import annotations

import os
from pathlib import Path

from secapi.core.settings import ScannerSettings

# Share of a scan container's memory limit given to GOMEMLIMIT. The rest is left to
# memory the Go runtime does not manage, such as the vulnerability DB's mapped pages.
CONTAINER_LIMIT_SHARE = 0.9
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def go_runtime_environment(
    scanner: ScannerSettings, *, memory_limit_bytes: int | None
) -> dict[str, str]:
    """Return the GOGC and GOMEMLIMIT variables of a Trivy process.

    ``memory_limit_bytes`` is the default limit, used when the scanner settings
    set none; None leaves GOMEMLIMIT out.
    """
    environment: dict[str, str] = {}
    if scanner.go_gc_percent is not None:
        environment["GOGC"] = str(scanner.go_gc_percent)
    limit = scanner.go_memory_limit_bytes or memory_limit_bytes
    if limit is not None:
        environment["GOMEMLIMIT"] = str(limit)
    return environment


def local_memory_limit(max_concurrent_scans: int) -> int | None:
    """Return the default GOMEMLIMIT of a local Trivy process, in bytes.

    Each of ``max_concurrent_scans`` processes may use its share of the memory
    twice over, as Go's default GOGC allows, before the sum reaches the machine's
    memory. None when the memory cannot be read.
    """
    total = available_memory_bytes()
    if total is None:
        return None
    return total // (2 * max_concurrent_scans)


def container_memory_limit(limit_bytes: int) -> int:
    """Return the default GOMEMLIMIT of a scan container with this memory limit, in bytes."""
    return int(limit_bytes * CONTAINER_LIMIT_SHARE)


def available_memory_bytes() -> int | None:
    """Return the machine's physical memory, or this process's cgroup memory limit if lower."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    cgroup_limit = _cgroup_memory_limit()
    if cgroup_limit is not None:
        return min(physical, cgroup_limit)
    return physical


def _cgroup_memory_limit() -> int | None:
    """Return this process's cgroup memory limit in bytes, None when unlimited or unknown.

    cgroup v2 names the process's group in /proc/self/cgroup. Under cgroup v1 a
    container's own group is the root of the memory hierarchy it mounts, and an
    unlimited group reports a huge number, which the caller's min() ignores.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        # The cgroup v2 entry reads "0::/path/of/the/group".
        if line.startswith("0::"):
            limit = _read_limit(_CGROUP_ROOT / line[3:].lstrip("/") / "memory.max")
            if limit is not None:
                return limit
    return _read_limit(_CGROUP_ROOT / "memory" / "memory.limit_in_bytes")


def _read_limit(path: Path) -> int | None:
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    # cgroup v2 writes "max" for no limit.
    return int(value) if value.isdigit() else None
