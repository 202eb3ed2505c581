"""Trivy's command lines, built as argument lists, and its version probe.

Everything here is a pure function from settings and options to a list of
arguments; nothing is ever joined into a shell string. The flags were checked
against ``trivy image --help`` of Trivy v0.74.0.

Two process-level facts shape the flags:

- ``--cache-backend memory`` keeps each process's scan cache in memory. Under
  the default fs backend it is a bbolt file opened for writing, and a second
  process would wait on its file lock. The vulnerability DB in ``--cache-dir`` is
  opened read-only, so all scans share it.
- ``--image-src remote`` makes Trivy read images from registries only. The
  other sources (docker, containerd, podman) would let API users scan images
  stored on the server's own container engine.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from secapi.core.scans.failures import classify_trivy_failure
from secapi.core.scans.options import ScanOptions
from secapi.core.settings import ScannerSettings, Settings

__all__ = [
    "TrivyVersion",
    "build_db_download_command",
    "build_scan_command",
    "build_version_command",
    "classify_trivy_failure",
    "effective_timeout",
    "job_trivy_flags",
    "parse_version_output",
    "probe_version",
    "resolve_cache_dir",
    "scan_flags",
]

VERSION_PROBE_TIMEOUT_SECONDS = 30


def effective_timeout(options: ScanOptions, scanner: ScannerSettings) -> int:
    """Return the scan's time limit in seconds: the requested one, within the server's maximum."""
    requested = options.timeout_seconds or scanner.timeout_seconds
    return min(requested, scanner.max_timeout_seconds)


def resolve_cache_dir(scanner: ScannerSettings, environment: Mapping[str, str]) -> Path:
    """Return the Trivy cache folder: the setting, else TRIVY_CACHE_DIR, else Trivy's default.

    A relative path is made absolute against the current folder: Trivy runs in
    a scratch folder of its own, where the relative path would name nothing.
    """
    if scanner.cache_dir is not None:
        folder = scanner.cache_dir
    elif environment.get("TRIVY_CACHE_DIR"):
        folder = Path(environment["TRIVY_CACHE_DIR"])
    else:
        base = environment.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        folder = Path(base) / "trivy"
    return folder.expanduser().absolute()


def _database_flags(scanner: ScannerSettings, *, skip_db_update: bool) -> list[str]:
    if scanner.server_url:
        # A client sends its requests to the server, which has the DB, so it downloads none.
        return []
    flags: list[str] = []
    if skip_db_update or scanner.offline:
        flags.append("--skip-db-update")
    if scanner.offline:
        # Nothing may leave the machine: no Java DB, no checks bundle, no Maven lookups.
        flags += ["--skip-java-db-update", "--skip-check-update", "--offline-scan"]
    if scanner.db_repository:
        flags += ["--db-repository", scanner.db_repository]
    if scanner.java_db_repository:
        flags += ["--java-db-repository", scanner.java_db_repository]
    return flags


def scan_flags(
    options: ScanOptions,
    scanner: ScannerSettings,
    *,
    timeout_seconds: int,
    skip_db_update: bool = False,
) -> list[str]:
    """Return the flags of ``trivy image`` that follow from the options and settings.

    Output, cache folder and image are left to the caller, because the local
    executor and the scan Job place them differently.
    """
    flags = [
        "--quiet",
        "--scanners",
        ",".join(options.scanners),
        "--severity",
        ",".join(options.severities),
    ]
    if options.ignore_unfixed:
        flags.append("--ignore-unfixed")
    if options.platform:
        flags += ["--platform", options.platform]
    flags += [
        "--timeout",
        f"{timeout_seconds}s",
        "--cache-backend",
        "memory",
        "--image-src",
        "remote",
        # The package inventory is not stored, and it can be most of a report's size.
        "--list-all-pkgs=false",
    ]
    flags += _database_flags(scanner, skip_db_update=skip_db_update)
    if scanner.insecure_registries:
        flags.append("--insecure")
    if scanner.server_url:
        flags += ["--server", scanner.server_url]
    flags += ["--skip-version-check", "--disable-telemetry"]
    return flags


def job_trivy_flags(options: ScanOptions, settings: Settings) -> list[str]:
    """Return the Trivy flags of a scan Job, without the output flags and the image.

    The Job's cache folder comes from its environment (TRIVY_CACHE_DIR on an
    emptyDir), so no --cache-dir is given here.
    """
    return scan_flags(
        options, settings.scanner, timeout_seconds=effective_timeout(options, settings.scanner)
    )


def build_scan_command(
    *,
    trivy_bin: str,
    image: str,
    output: Path,
    options: ScanOptions,
    scanner: ScannerSettings,
    cache_dir: Path,
    timeout_seconds: int,
    skip_db_update: bool = False,
) -> list[str]:
    """Return the argument list of one local scan, writing Trivy's JSON report to ``output``.

    ``image`` must be a validated reference. It comes after ``--``, so even a
    value starting with a dash could not be read as a flag.
    """
    return [
        trivy_bin,
        "image",
        "--format",
        "json",
        "--output",
        str(output),
        *scan_flags(
            options, scanner, timeout_seconds=timeout_seconds, skip_db_update=skip_db_update
        ),
        "--cache-dir",
        str(cache_dir),
        "--",
        image,
    ]


def build_db_download_command(
    *, trivy_bin: str, scanner: ScannerSettings, cache_dir: Path, timeout_seconds: int
) -> list[str]:
    """Return the argument list that downloads or updates the vulnerability DB only."""
    command = [
        trivy_bin,
        "image",
        "--download-db-only",
        "--quiet",
        "--timeout",
        f"{timeout_seconds}s",
        "--cache-dir",
        str(cache_dir),
    ]
    if scanner.db_repository:
        command += ["--db-repository", scanner.db_repository]
    if scanner.insecure_registries:
        command.append("--insecure")
    command += ["--skip-version-check", "--disable-telemetry"]
    return command


def build_version_command(*, trivy_bin: str, cache_dir: Path) -> list[str]:
    return [trivy_bin, "version", "--format", "json", "--cache-dir", str(cache_dir)]


@dataclass(frozen=True)
class TrivyVersion:
    """Trivy's version and, when a DB is present, when the DB was built."""

    version: str
    db_updated_at: datetime | None
    db_next_update: datetime | None


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def parse_version_output(output: bytes) -> TrivyVersion:
    """Parse ``trivy version --format json``; raise ValueError when it is not that output."""
    try:
        data = json.loads(output)
    except json.JSONDecodeError as error:
        raise ValueError(f"trivy version printed no JSON: {output[:200]!r}") from error
    if not isinstance(data, dict) or not isinstance(data.get("Version"), str):
        raise ValueError(f"trivy version printed JSON without a Version: {output[:200]!r}")
    database = data.get("VulnerabilityDB")
    database = database if isinstance(database, dict) else {}
    return TrivyVersion(
        version=data["Version"],
        db_updated_at=_timestamp(database.get("UpdatedAt")),
        db_next_update=_timestamp(database.get("NextUpdate")),
    )


async def probe_version(
    *, trivy_bin: str, cache_dir: Path, environment: Mapping[str, str] | None = None
) -> TrivyVersion:
    """Run ``trivy version`` and return what it reports.

    Raises OSError when the binary cannot be started and RuntimeError when it
    fails or times out.
    """
    command: Sequence[str] = build_version_command(trivy_bin=trivy_bin, cache_dir=cache_dir)
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ if environment is None else environment),
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(), timeout=VERSION_PROBE_TIMEOUT_SECONDS
        )
    except (TimeoutError, asyncio.CancelledError) as error:
        process.kill()
        await process.wait()
        if isinstance(error, asyncio.CancelledError):
            raise
        raise RuntimeError(
            f"{trivy_bin} version timed out after {VERSION_PROBE_TIMEOUT_SECONDS} seconds"
        ) from None
    if process.returncode != 0:
        raise RuntimeError(
            f"{trivy_bin} version exited with status {process.returncode}: "
            f"{stderr.decode(errors='replace').strip()[-500:]}"
        )
    try:
        return parse_version_output(stdout)
    except ValueError as error:
        raise RuntimeError(str(error)) from error
