"""Debian packages the bed needs, installed with apt-get when missing and run as root."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from tests.testbed.processes import BedError

log = logging.getLogger("testbed")

# busybox runs the scan Job script under the same shell the scanner image has.
PACKAGES = (
    "postgresql",
    "redis-server",
    "docker-registry",
    "umoci",
    "skopeo",
    "openssl",
    "busybox",
)

# Debian's invoke-rc.d asks this script whether a package may start its service.
# Exit code 101 means "no": the packaged PostgreSQL, Redis and registry would
# otherwise start with Debian's defaults (the registry on every interface).
_POLICY_RC = Path("/usr/sbin/policy-rc.d")


def _is_installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Status}", package],
        capture_output=True,
        text=True,
    )
    return result.returncode == 0 and result.stdout.strip() == "install ok installed"


def missing_packages() -> list[str]:
    return [package for package in PACKAGES if not _is_installed(package)]


def ensure_packages() -> None:
    """Install missing packages (root only); otherwise name them and the command to run."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise BedError(
            f"missing Debian packages: {' '.join(missing)}; install them with "
            f"`sudo apt-get install {' '.join(missing)}` and run `up` again"
        )

    log.info("installing Debian packages: %s", " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    added_policy = False
    if not _POLICY_RC.exists():
        _POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        _POLICY_RC.chmod(0o755)
        added_policy = True
    try:
        for args in (
            ["apt-get", "update"],
            ["apt-get", "install", "--yes", "--no-install-recommends", *missing],
        ):
            result = subprocess.run(args, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise BedError(
                    f"`{' '.join(args)}` failed (exit code {result.returncode}):\n"
                    f"{result.stderr[-2000:]}"
                )
    finally:
        if added_policy:
            _POLICY_RC.unlink(missing_ok=True)
