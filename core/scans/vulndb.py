"""Keep the local executor's vulnerability DB present and fresh, one writer at a time.

Trivy v0.74.0 opens ``<cache>/db/trivy.db`` read-only, so any number of scans
may read it at once. An update, however, rewrites the file in place, and a
scan reading it meanwhile may crash or read a half-written DB; Trivy only
serialises updates within one process. So the local executor downloads the
DB itself, with ``trivy image --download-db-only``, while no scan of this
process runs, and every scan runs with ``--skip-db-update``.

A failed download is remembered for a short while: scans that need a missing
DB fail at once with reason DatabaseUnavailable and Trivy's message, instead
of each trying again against a network that refuses.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from secapi.core.scans.failures import classify_trivy_failure, secret_values
from secapi.core.scans.process import start_trivy
from secapi.core.scans.trivy import build_db_download_command
from secapi.core.settings import ScannerSettings

log = structlog.get_logger(__name__)

# trivy-db schema version that Trivy v0.74.0 reads.
DB_SCHEMA_VERSION = 2
# Trivy itself skips an update within an hour of the last download.
MIN_UPDATE_INTERVAL = timedelta(hours=1)
# Seconds a failed download is remembered before the next attempt.
RETRY_AFTER_SECONDS = 60.0
# Maximum duration of one download, in seconds.
DOWNLOAD_TIMEOUT_SECONDS = 600


class DatabaseUnavailableError(Exception):
    """No usable vulnerability DB exists. ``message`` gives the cause, in Trivy's words when it printed one."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _with_next_step(cause: str) -> str:
    """Append what a user and an administrator can do about a missing DB to its cause."""
    return (
        f"{cause}. Scans need Trivy's vulnerability DB and this server has none; submit the "
        f"scan again later (the next download is tried after {RETRY_AFTER_SECONDS:g} seconds). "
        "Administrators: let the server reach the DB repository "
        "(SECAPI_SCANNER__DB_REPOSITORY), or put a DB in its cache folder and set "
        "SECAPI_SCANNER__OFFLINE=true"
    )


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def database_state(cache_dir: Path, *, now: datetime) -> tuple[bool, bool]:
    """Return (present, needs_update) for the DB in ``cache_dir``, by Trivy's own rules."""
    db_dir = cache_dir / "db"
    try:
        metadata = json.loads((db_dir / "metadata.json").read_text())
    except (OSError, ValueError):
        return False, True
    if not (db_dir / "trivy.db").is_file() or not isinstance(metadata, dict):
        return False, True
    if metadata.get("Version") != DB_SCHEMA_VERSION:
        return False, True

    next_update = _timestamp(metadata.get("NextUpdate"))
    downloaded_at = _timestamp(metadata.get("DownloadedAt"))
    if next_update is None or now < next_update:
        return True, False
    if downloaded_at is not None and now < downloaded_at + MIN_UPDATE_INTERVAL:
        return True, False
    return True, True


class VulnerabilityDatabase:
    """The DB in one cache folder, shared by the scans of this process.

    Scans use it together (``reading``). A download uses it alone: it waits
    for running scans to finish, and new scans wait behind a waiting download.
    """

    def __init__(
        self,
        *,
        trivy_bin: str,
        scanner: ScannerSettings,
        cache_dir: Path,
        environment: Mapping[str, str],
    ) -> None:
        self._trivy_bin = trivy_bin
        self._scanner = scanner
        self.cache_dir = cache_dir
        self._environment = dict(environment)
        self._condition = asyncio.Condition()
        self._readers = 0
        self._writers_waiting = 0
        self._writing = False
        self._failure: tuple[float, str] | None = None
        # Bumped after every download, so callers know to probe the DB's date again.
        self.generation = 0

    @property
    def managed(self) -> bool:
        """Whether this process downloads the DB; not in client/server or offline mode."""
        return not self._scanner.server_url and not self._scanner.offline

    async def ensure_ready(self) -> None:
        """Download the DB when it is missing or due; raise DatabaseUnavailableError without one.

        A stale DB whose update fails is kept and used, with a warning.
        """
        if not self.managed:
            return
        present, needs_update = database_state(self.cache_dir, now=datetime.now(UTC))
        if not needs_update:
            return
        failure = self._recent_failure()
        if failure is not None:
            if present:
                return
            raise DatabaseUnavailableError(_with_next_step(failure))

        async with self._exclusive():
            # Another scan may have downloaded it, or failed to, while this one waited.
            present, needs_update = database_state(self.cache_dir, now=datetime.now(UTC))
            if not needs_update:
                return
            message = self._recent_failure() or await self._download()
            present, _ = database_state(self.cache_dir, now=datetime.now(UTC))
        if message is None and present:
            return
        message = (
            message or f"trivy reported success but {self.cache_dir / 'db'} holds no usable DB"
        )
        if present:
            log.warning("vulnerability db update failed; using the old db", error=message)
            return
        raise DatabaseUnavailableError(_with_next_step(message))

    def _recent_failure(self) -> str | None:
        if self._failure is None:
            return None
        failed_at, message = self._failure
        return message if time.monotonic() - failed_at < RETRY_AFTER_SECONDS else None

    async def _download(self) -> str | None:
        """Run the download; return None on success, else Trivy's trimmed message."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        command = build_db_download_command(
            trivy_bin=self._trivy_bin,
            scanner=self._scanner,
            cache_dir=self.cache_dir,
            timeout_seconds=DOWNLOAD_TIMEOUT_SECONDS,
        )
        log.info("vulnerability db download started", cache_dir=str(self.cache_dir))
        try:
            process = await start_trivy(command, environment=self._environment)
        except OSError as error:
            message = f"trivy could not be started to download the vulnerability DB: {error}"
            self._failure = (time.monotonic(), message)
            return message
        result = await process.wait(timeout_seconds=DOWNLOAD_TIMEOUT_SECONDS + 10)
        self.generation += 1
        if result.returncode == 0 and not result.timed_out:
            self._failure = None
            log.info("vulnerability db downloaded", cache_dir=str(self.cache_dir))
            return None

        if result.timed_out:
            message = (
                f"the vulnerability DB download did not finish within "
                f"{DOWNLOAD_TIMEOUT_SECONDS} seconds"
            )
        else:
            _, message = classify_trivy_failure(
                result.stderr,
                result.returncode or 1,
                secrets=secret_values(self._environment),
            )
        self._failure = (time.monotonic(), message)
        log.error("vulnerability db download failed", error=message)
        return message

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        async with self._condition:
            self._writers_waiting += 1
            try:
                await self._condition.wait_for(lambda: self._readers == 0 and not self._writing)
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            async with self._condition:
                self._writing = False
                self._condition.notify_all()

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """Hold the DB for one scan; no download starts until it is released."""
        async with self._condition:
            await self._condition.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._condition:
                self._readers -= 1
                self._condition.notify_all()
