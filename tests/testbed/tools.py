"""The Go binaries the bed runs: reuse the cached builds, wait for or start missing ones.

build_tools.py takes a lock per tool, so two builds of one tool never overlap.
A build started by an older copy of build_tools.py holds no lock, so while any
build_tools.py process runs, the bed waits for its `.complete` files instead
of starting a second build of the same tool.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.testbed import build_tools
from tests.testbed.processes import BedError

log = logging.getLogger("testbed")

BUILD_TIMEOUT = 90 * 60.0  # seconds; a cold Kubernetes build on 2 cores takes tens of minutes
BUILD_LOG = Path("/tmp/build.log")

# The binaries of SECAPI_TEST_BIN: binary name -> tool that builds it.
BINARIES = {
    "trivy": "trivy",
    "etcd": "etcd",
    "kube-apiserver": "kubernetes",
    "kube-controller-manager": "kubernetes",
    "kubectl": "kubernetes",
    "helm": "helm",
}


def tool_folder(tool: str) -> Path:
    return build_tools.tool_dir(build_tools.TOOLS[tool])


def binary_path(binary: str) -> Path:
    return tool_folder(BINARIES[binary]) / binary


def is_built(tool: str) -> bool:
    return (tool_folder(tool) / ".complete").exists()


def _running_builds() -> list[psutil.Process]:
    builds = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(part.endswith("build_tools.py") for part in cmdline[:3]):
            builds.append(process)
    return builds


def ensure_tools(tools: list[str] | None = None) -> dict[str, float]:
    """Make sure every tool is built; return the seconds waited or spent per tool built now."""
    requested = tools or list(build_tools.TOOLS)
    waited: dict[str, float] = {}
    missing = [tool for tool in requested if not is_built(tool)]
    if not missing:
        return waited

    started = time.monotonic()
    deadline = started + BUILD_TIMEOUT
    builds = _running_builds()
    if builds:
        pids = ", ".join(str(process.pid) for process in builds)
        log.info(
            "waiting for the running build (process %s, log %s) of: %s",
            pids,
            BUILD_LOG,
            ", ".join(missing),
        )
    while builds and missing:
        if time.monotonic() > deadline:
            raise BedError(
                f"the Go build of {', '.join(missing)} did not finish within "
                f"{BUILD_TIMEOUT / 60:.0f} min; see {BUILD_LOG}"
            )
        time.sleep(5)
        for tool in list(missing):
            if is_built(tool):
                waited[tool] = time.monotonic() - started
                log.info("%s is built (waited %.0f s)", tool, waited[tool])
                missing.remove(tool)
        builds = [process for process in builds if process.is_running()]

    for tool in missing:
        log.info("building %s (cold builds take minutes; output in %s)", tool, BUILD_LOG)
        tool_started = time.monotonic()
        with BUILD_LOG.open("a") as build_log:
            result = subprocess.run(
                [sys.executable, build_tools.__file__, tool],
                stdout=build_log,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT,
            )
        if result.returncode != 0 or not is_built(tool):
            raise BedError(
                f"building {tool} failed (exit code {result.returncode}); "
                f"see the end of {BUILD_LOG}, fix the cause and run `up` again"
            )
        waited[tool] = time.monotonic() - tool_started
    return waited


def link_binaries(folder: Path) -> None:
    """Fill `folder` with symlinks to every binary, the value of SECAPI_TEST_BIN."""
    folder.mkdir(parents=True, exist_ok=True)
    for binary in BINARIES:
        link = folder / binary
        target = binary_path(binary)
        if link.is_symlink() or link.exists():
            if link.is_symlink() and link.readlink() == target:
                continue
            link.unlink()
        link.symlink_to(target)
