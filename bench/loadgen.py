"""The HTTP load generator: wrk (Debian package `wrk`), driven by bench/wrk/load.lua.

wrk is a C program with an event loop per thread. One thread keeping 16
connections busy uses a small share of one core, so the server under test
keeps most of the machine. Each run is bounded by its duration and its
request count, and only ever targets 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from bench.context import say

LUA_SCRIPT = Path(__file__).resolve().parent / "wrk" / "load.lua"


def wrk_binary() -> str:
    """Return the path of wrk, installing Debian's package first when running as root."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("wrk is not installed; install it with `sudo apt-get install wrk`")
    say("installing wrk with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for args in (
        ["apt-get", "update"],
        ["apt-get", "install", "--yes", "--no-install-recommends", "wrk"],
    ):
        result = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` failed: {result.stderr[-1000:]}")
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("apt-get installed wrk, but it is not on PATH")
    return found


def wrk_version() -> str:
    """Return wrk's version, e.g. "wrk 4.1.0-3+b2" (Debian's build prints "debian/4.1.0-3+b2")."""
    result = subprocess.run(
        [wrk_binary(), "--version"], capture_output=True, text=True, check=False
    )
    words = (result.stdout or result.stderr).split()
    version = words[1] if len(words) > 1 else "unknown"
    return f"wrk {version.removeprefix('debian/')}"


def _cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    seconds = {}
    for name, process in processes.items():
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[name] = times.user + times.system
    return seconds


def run_wrk(
    url: str,
    *,
    method: str,
    body: str = "",
    api_key: str = "",
    connections: int = 16,
    duration_seconds: float = 10,
    max_requests: int = 1_000_000,
    processes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Run one wrk load against `url`; return its JSON summary and CPU use.

    `processes` names processes (e.g. the server) whose CPU seconds during the
    run are added to the summary under `cpu_seconds`, with wrk's own as "wrk".
    """
    host = urlsplit(url).hostname
    if host != "127.0.0.1":
        raise ValueError(f"refusing to load {url}: the benchmarks only target 127.0.0.1")
    env = dict(
        os.environ,
        BENCH_METHOD=method,
        BENCH_BODY=body,
        BENCH_API_KEY=api_key,
        BENCH_MAX_REQUESTS=str(max_requests),
    )
    args = [
        wrk_binary(),
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{duration_seconds:g}s",
        "--timeout",
        "10s",
        "--script",
        str(LUA_SCRIPT),
        url,
    ]
    watched = {name: psutil.Process(pid) for name, pid in (processes or {}).items()}
    before = _cpu_seconds(watched)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)

    result = subprocess.run(
        args, env=env, capture_output=True, text=True, check=False, timeout=duration_seconds + 60
    )

    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = _cpu_seconds(watched)
    if result.returncode != 0:
        raise RuntimeError(
            f"wrk failed with exit code {result.returncode}: {result.stderr[-1000:]}"
        )
    summary_line = next((line for line in result.stdout.splitlines() if line.startswith("{")), None)
    if summary_line is None:
        raise RuntimeError(f"wrk printed no summary: {result.stdout[-1000:]}")
    summary: dict[str, Any] = json.loads(summary_line)
    if summary["responses"] >= max_requests:
        # The Lua script stopped early, so requests / duration would understate the rate.
        raise RuntimeError(
            f"wrk reached its bound of {max_requests} responses before {duration_seconds:g} s; "
            "raise max_requests so the duration ends the run"
        )
    summary["requests_per_second"] = round(summary["requests"] / (summary["duration_us"] / 1e6), 1)
    cpu = {name: round(after[name] - before[name], 3) for name in after if name in before}
    cpu["wrk"] = round(
        (children_after.ru_utime - children_before.ru_utime)
        + (children_after.ru_stime - children_before.ru_stime),
        3,
    )
    summary["cpu_seconds"] = cpu
    return summary
