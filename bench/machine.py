"""What the figures were measured on: the machine, its load, and the versions of every part."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.bed import Bed

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON_PACKAGES = ("fastapi", "uvicorn", "uvloop", "httptools", "sqlalchemy", "psycopg", "kopf")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    load_1, load_5, load_15 = os.getloadavg()
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(memory.total / 2**30, 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "load_average_at_start": [round(load_1, 2), round(load_5, 2), round(load_15, 2)],
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _run(args: list[str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def _trivy_version(bed: Bed) -> str:
    output = _run([str(bed.trivy_bin), "version", "--format", "json"])
    try:
        return str(json.loads(output)["Version"])
    except (ValueError, KeyError):
        return output or "unknown"


def _kubernetes_version(bed: Bed) -> str:
    output = _run([str(bed.kubectl), "--kubeconfig", str(bed.kubeconfig), "version", "-o", "json"])
    try:
        return str(json.loads(output)["serverVersion"]["gitVersion"])
    except (ValueError, KeyError):
        return "unknown"


def _postgres_version(bed: Bed) -> str:
    with psycopg.connect(bed.database_url, connect_timeout=10) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def _git_commit() -> dict[str, Any]:
    commit = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    # Only tracked files count: the bed's and the benchmark's own scratch files are untracked.
    # The benchmark's own outputs, changed by every earlier run, do not count either.
    changed = _run(
        [
            "git",
            "-C",
            str(REPO_ROOT),
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)BENCHMARKS.md",
            ":(exclude)bench/results",
        ]
    )
    return {"commit": commit or "unknown", "uncommitted_changes": bool(changed)}


def describe_versions(bed: Bed) -> dict[str, Any]:
    packages = {}
    for name in PYTHON_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    return {
        "python": platform.python_version(),
        "python_implementation": sys.implementation.name,
        "secapi": metadata.version("secapi"),
        "git": _git_commit(),
        "trivy": _trivy_version(bed),
        "kubernetes": _kubernetes_version(bed),
        "postgresql": _postgres_version(bed),
        "python_packages": packages,
    }
