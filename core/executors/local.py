"""The local executor: a bounded pool of Trivy processes on this machine.

The queue is the set of ``pending`` rows of executor "local" in the
database, so there is no queue in memory to lose. Workers claim rows (highest
priority, then oldest) with a race-safe conditional update, run Trivy, and
store the results or the failure. Every worker also polls, so rows written by
another process are found too.

A submit hands its scan to an idle worker at once, before the scan's row
commits (``start_before_commit``). The row is then written as running and
owned by that worker, so it never waits in the queue and needs no claim. The
worker starts Trivy at once, and the commit runs while Trivy does. If the
commit fails, Trivy is killed and nothing is written. A submit that finds no
idle worker commits a pending row, and a worker claims it from the queue.
If this process dies, Trivy dies with it (see secapi.core.scans.process),
and the restart puts its running rows back in the queue.

Restart safety: each process has a worker id (host, pid and a random token)
that it writes into the rows it claims. On start, rows left ``running`` by a
dead process on this host are put back in the queue once. A row orphaned a
second time fails with reason Interrupted. Rows whose owner cannot be checked
(another host) are reclaimed once they are well past their time limit.
Housekeeping also fails rows that waited longer than
``queue_timeout_seconds`` with reason QueueTimeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import socket
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from secapi.core.db.engine import sync_sqlite_engine
from secapi.core.db.models import Scan, ScanStatus, utcnow
from secapi.core.errors import ServiceUnavailableError
from secapi.core.executors.base import EarlyStart
from secapi.core.scans import repository
from secapi.core.scans.failures import classify_trivy_failure, secret_values
from secapi.core.scans.go_runtime import go_runtime_environment, local_memory_limit
from secapi.core.scans.locate import find_trivy
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.process import TrivyProcess, start_trivy, trivy_environment
from secapi.core.scans.reasons import FailureReason
from secapi.core.scans.report import ParsedReport, ReportError, parse_report
from secapi.core.scans.store import store_results, store_results_sync
from secapi.core.scans.trivy import (
    TrivyVersion,
    build_scan_command,
    effective_timeout,
    probe_version,
    resolve_cache_dir,
)
from secapi.core.scans.vulndb import DatabaseUnavailableError, VulnerabilityDatabase
from secapi.core.scans.waiting import scan_ended
from secapi.core.settings import Settings

log = structlog.get_logger(__name__)

EXECUTOR_NAME = "local"
# A scan is claimed at most this often; after that an orphaned scan fails.
MAX_ATTEMPTS = 2
# Seconds between polls of the queue when no submit wakes the workers.
POLL_SECONDS = 2.0
# Seconds between housekeeping rounds (queue timeouts, orphans of other hosts).
HOUSEKEEPING_SECONDS = 15.0
# Seconds Trivy gets past its own --timeout before its process group is killed.
KILL_GRACE_SECONDS = 10
# Seconds past a scan's time limit after which a running row of another
# process counts as orphaned; its owner would have killed it long before.
ORPHAN_GRACE_SECONDS = 120

# Worker ids of the executors running in this process, which are never orphans.
_LIVE_WORKERS: set[str] = set()


def new_worker_id() -> str:
    host = socket.gethostname()[:40]
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dead_local_worker(worker_id: str | None) -> bool:
    """Tell whether ``worker_id`` names a worker of this host that no longer runs.

    A worker of another host cannot be checked and counts as alive.
    """
    if worker_id is None:
        return True
    if worker_id in _LIVE_WORKERS:
        return False
    host, _, rest = worker_id.partition(":")
    pid_text, _, _token = rest.partition(":")
    if host != socket.gethostname()[:40] or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    # Our own pid under a token that is not live here was a predecessor with the same pid.
    return pid == os.getpid() or not _pid_alive(pid)


def _kill_unless_claimed(process: TrivyProcess, claim: asyncio.Task[bool]) -> None:
    """Kill a handed-off scan's Trivy when its claim failed or raised."""
    if process.finished:
        return
    if claim.cancelled() or claim.exception() is not None or not claim.result():
        process.kill()


def _log_claimed_start(logger: Any, image: str, claim: asyncio.Task[bool]) -> None:
    """Log the start of a handed-off scan whose claim succeeded."""
    if not claim.cancelled() and claim.exception() is None and claim.result():
        # A handed-off scan was just submitted, so this is its first attempt.
        logger.info("scan started", image=image, attempt=1)


class _HandOff:
    """A scan given to an idle worker, with the outcome of its commit when it started early."""

    def __init__(self, scan: Scan, early: EarlyStart | None = None) -> None:
        self.scan = scan
        self.early = early


class _Outcome:
    """The end of one run: a parsed report, or a failure reason and message."""

    def __init__(
        self,
        *,
        report: ParsedReport | None = None,
        reason: FailureReason | None = None,
        message: str = "",
    ) -> None:
        self.report = report
        self.reason = reason
        self.message = message
        # Seconds from starting Trivy to its exit, for the log.
        self.trivy_seconds: float | None = None


def _load_report(output: Path, limit: int) -> _Outcome:
    """Parse the report file Trivy wrote (blocking; run it in a thread)."""
    try:
        size = output.stat().st_size
    except FileNotFoundError:
        return _Outcome(
            reason=FailureReason.REPORT_INVALID,
            message="trivy exited with status 0 but wrote no report",
        )
    if size > limit:
        return _Outcome(
            reason=FailureReason.REPORT_TOO_LARGE,
            message=f"Trivy's report is {size} bytes, more than the maximum of {limit}; "
            "raise SECAPI_SCANNER__MAX_REPORT_BYTES or scan with fewer scanners",
        )
    try:
        report = parse_report(output, max_bytes=limit)
    except ReportError as error:
        return _Outcome(
            reason=FailureReason.REPORT_INVALID,
            message=f"Trivy's report could not be read: {error}",
        )
    return _Outcome(report=report)


class LocalExecutor:
    name = EXECUTOR_NAME

    def __init__(
        self,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        poll_seconds: float = POLL_SECONDS,
        housekeeping_seconds: float = HOUSEKEEPING_SECONDS,
    ) -> None:
        self._settings = settings
        self._scanner = settings.scanner
        self._session_factory = session_factory
        self._poll_seconds = poll_seconds
        self._housekeeping_seconds = housekeeping_seconds
        self.worker_id = new_worker_id()
        self._go_environment = go_runtime_environment(
            self._scanner,
            memory_limit_bytes=local_memory_limit(self._scanner.max_concurrent_scans),
        )
        self._environment = {**trivy_environment(), **self._go_environment}
        self._cache_dir = resolve_cache_dir(self._scanner, os.environ)
        # Futures of idle workers: a submit resolves one with its scan, a wake-up all with None.
        self._idle: list[asyncio.Future[_HandOff | None]] = []
        # Set by a wake-up that found no idle worker, so a worker that is claiming claims again.
        self._wake_requested = False
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._processes: dict[str, TrivyProcess] = {}
        self._cancelled: set[str] = set()
        self._trivy: Path | None = None
        self._database: VulnerabilityDatabase | None = None
        self._version: TrivyVersion | None = None
        self._version_generation = -1
        # On SQLite, a synchronous engine on the same file stores results in one thread hop.
        self._sync_engine: Engine | None = None

    # -- the Executor protocol -------------------------------------------------------------

    async def start(self) -> None:
        """Find Trivy, recover orphaned scans and start the workers.

        Starts even without Trivy, so the API still serves reads. Submits
        then fail with ServiceUnavailableError (503), and check_ready names the cause.
        """
        self._stopping = False
        _LIVE_WORKERS.add(self.worker_id)
        self._trivy = find_trivy(self._scanner.trivy_bin)
        if self._trivy is None:
            log.error(
                "trivy not found; scans cannot run",
                trivy_bin=self._scanner.trivy_bin,
            )
        else:
            self._database = VulnerabilityDatabase(
                trivy_bin=str(self._trivy),
                scanner=self._scanner,
                cache_dir=self._cache_dir,
                environment=self._environment,
            )

        self._sync_engine = sync_sqlite_engine(self._session_factory)
        with contextlib.suppress(SQLAlchemyError, OSError):
            await self._recover_orphans(all_hosts=False)
        for index in range(self._scanner.max_concurrent_scans):
            self._tasks.append(
                asyncio.create_task(self._worker(index), name=f"scan-worker-{index}")
            )
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="scan-housekeeping"))
        log.info(
            "local executor started",
            worker_id=self.worker_id,
            workers=self._scanner.max_concurrent_scans,
            trivy=str(self._trivy) if self._trivy else None,
            cache_dir=str(self._cache_dir),
            go_gc_percent=self._go_environment.get("GOGC"),
            go_memory_limit_bytes=self._go_environment.get("GOMEMLIMIT"),
        )

    async def stop(self) -> None:
        """Stop the workers; scans they were running go back to the queue."""
        self._stopping = True
        self._wake_workers()
        # Cancelling a worker kills its Trivy process group (see TrivyProcess.wait).
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        with contextlib.suppress(SQLAlchemyError, OSError):
            await self._release_running()
        if self._sync_engine is not None:
            self._sync_engine.dispose()
            self._sync_engine = None
        _LIVE_WORKERS.discard(self.worker_id)
        log.info("local executor stopped", worker_id=self.worker_id)

    def start_before_commit(self, scan: Scan) -> EarlyStart | None:
        """Give ``scan`` to an idle worker before its row commits; None when none is idle.

        Marks ``scan`` as running for that worker, so the row is committed
        already claimed. The worker starts Trivy at once. When the submit
        abandons the scan instead of committing it, the worker kills Trivy
        and writes nothing.
        """
        if self._stopping or not self._tasks or self._trivy is None:
            return None
        early = EarlyStart()
        if not self._hand_off(_HandOff(scan, early)):
            return None
        scan.status = ScanStatus.RUNNING.value
        scan.worker_id = self.worker_id
        scan.started_at = utcnow()
        scan.attempts = 1
        return early

    async def submit(self, scan: Scan) -> None:
        if self._stopping or not self._tasks:
            raise ServiceUnavailableError(
                "the local executor is not running, so the scan cannot start; restart the server"
            )
        if self._trivy is None:
            raise ServiceUnavailableError(self._trivy_missing_message())
        if not self._hand_off(_HandOff(scan)):
            self._wake_workers()

    def _hand_off(self, hand_off: _HandOff) -> bool:
        """Give a scan to an idle worker; return False when no worker is idle."""
        while self._idle:
            future = self._idle.pop(0)
            if not future.done():
                future.set_result(hand_off)
                return True
        return False

    def _wake_workers(self) -> None:
        """Make every worker look for pending rows now."""
        self._wake_requested = True
        for future in self._idle:
            if not future.done():
                future.set_result(None)
        self._idle.clear()

    async def cancel(self, scan: Scan) -> None:
        self._cancelled.add(scan.id)
        process = self._processes.get(scan.id)
        if process is not None:
            process.kill()
            log.info("scan process killed on cancel", scan_id=scan.id, pid=process.pid)

    async def check_ready(self) -> None:
        if self._trivy is None:
            raise ServiceUnavailableError(self._trivy_missing_message())
        if self._stopping or not self._tasks or all(task.done() for task in self._tasks):
            raise ServiceUnavailableError("the local executor's workers are not running")

    def _trivy_missing_message(self) -> str:
        return (
            f"Trivy was not found: {self._scanner.trivy_bin!r} is neither an executable path "
            "nor on PATH; install Trivy v0.74.0 or set SECAPI_SCANNER__TRIVY_BIN"
        )

    # -- the worker loop -------------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        claim_now = True
        while not self._stopping:
            scan: Scan | None = None
            if claim_now:
                # Cleared before the claim: a wake-up during it is seen below, so none is lost.
                self._wake_requested = False
                try:
                    scan = await self._claim()
                except (SQLAlchemyError, OSError) as error:
                    log.warning("claiming a scan failed; retrying", worker=index, error=str(error))
                    await asyncio.sleep(self._poll_seconds)
                    continue
                if scan is not None:
                    # More may wait behind it: a worker that ends a handed-off scan must
                    # claim too, or its slot idles until the next poll.
                    self._wake_requested = True
            claim: asyncio.Task[bool] | None = None
            if scan is None:
                claim_now = True
                if self._wake_requested:
                    continue
                hand_off = await self._wait_idle()
                if hand_off is None:
                    continue
                scan = hand_off.scan
                claim = asyncio.create_task(self._claim_after_commit(hand_off))
            try:
                await self._run(scan, claim=claim)
            except asyncio.CancelledError:
                if claim is not None:
                    claim.cancel()
                raise
            except Exception:
                log.exception("scan worker failed", scan_id=scan.id, worker=index)
                if claim is None or await self._owned(claim):
                    await self._fail(scan.id, FailureReason.SCANNER_ERROR, "the scan worker failed")
            # A scan from the queue may have more behind it, so the worker claims again. A
            # handed-off scan found the queue empty, and every later submit was either handed
            # off or set _wake_requested. Rows of other processes are found by the next poll.
            # So after a handed-off scan the claim is skipped, and its write does not compete
            # with the requests that read the scan that just ended.
            claim_now = claim is None or self._wake_requested

    async def _wait_idle(self) -> _HandOff | None:
        """Wait for a handed-off scan, a wake-up or the next poll; return the scan, if any."""
        future: asyncio.Future[_HandOff | None] = asyncio.get_running_loop().create_future()
        self._idle.append(future)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(future), timeout=self._poll_seconds)
        finally:
            with contextlib.suppress(ValueError):
                self._idle.remove(future)
        # A scan handed off as the wait timed out is still taken.
        return future.result() if future.done() else None

    async def _claim_after_commit(self, hand_off: _HandOff) -> bool:
        """Own a handed-off scan; return False when it is not this worker's to run.

        A scan started before its commit was written already claimed, so it
        is owned once the commit succeeded. Otherwise the pending row is claimed.
        """
        if hand_off.early is not None:
            return await hand_off.early.committed()
        return await self._claim_handed(hand_off.scan.id)

    async def _claim_handed(self, scan_id: str) -> bool:
        """Claim a scan handed off by a submit; return False when it is no longer pending."""
        async with self._session_factory() as session:
            claimed = await repository.mark_running(
                session, scan_id=scan_id, worker_id=self.worker_id, started_at=utcnow()
            )
            await session.commit()
            return claimed

    async def _owned(self, claim: asyncio.Task[bool]) -> bool:
        """Return whether the claim of a handed-off scan succeeded; an error counts as lost."""
        try:
            return await claim
        except (SQLAlchemyError, OSError) as error:
            log.warning("claiming a handed-off scan failed", error=str(error))
            return False
        except Exception:
            log.exception("claiming a handed-off scan failed")
            return False

    async def _claim(self) -> Scan | None:
        if self._trivy is None:
            return None
        async with self._session_factory() as session:
            scan = await repository.claim_next_pending(
                session, executor=EXECUTOR_NAME, worker_id=self.worker_id
            )
            await session.commit()
            return scan

    async def _run(self, scan: Scan, *, claim: asyncio.Task[bool] | None = None) -> None:
        """Run a claimed scan, or with ``claim``, a handed-off scan whose claim is under way.

        Nothing is written for a handed-off scan until its claim has succeeded.
        """
        bound = log.bind(scan_id=scan.id, user_id=scan.user_id)
        if claim is None:
            bound.info("scan started", image=scan.image, attempt=scan.attempts)
        else:
            # Logged once the claim succeeds, so after the submit's "scan submitted" line.
            claim.add_done_callback(functools.partial(_log_claimed_start, bound, scan.image))

        async def owned() -> bool:
            if claim is None or await self._owned(claim):
                return True
            bound.info("scan claimed elsewhere or deleted; this run is dropped")
            return False

        try:
            options = ScanOptions.model_validate(scan.options or {})
        except ValidationError as error:
            if not await owned():
                return
            await self._fail(
                scan.id,
                FailureReason.INVALID_INPUT,
                f"the stored scan options are invalid: {error}",
            )
            return
        timeout = effective_timeout(options, self._scanner)

        assert self._database is not None
        try:
            await self._database.ensure_ready()
        except DatabaseUnavailableError as error:
            if not await owned():
                return
            await self._fail(scan.id, FailureReason.DATABASE_UNAVAILABLE, error.message)
            bound.warning("scan failed", reason=FailureReason.DATABASE_UNAVAILABLE.value)
            return

        async with self._database.reading():
            version = await self._trivy_version()
            outcome = await self._scan(scan, options, timeout, claim=claim)

        if not await owned():
            return
        if scan.id in self._cancelled:
            self._cancelled.discard(scan.id)
            bound.info("scan cancelled")
            return
        if self._stopping:
            # stop() returns the row to the queue.
            return
        if outcome.report is None:
            reason = outcome.reason or FailureReason.SCANNER_ERROR
            await self._fail(scan.id, reason, outcome.message)
            bound.warning("scan failed", reason=reason.value, message=outcome.message)
            return
        await self._complete(scan.id, outcome.report, version, trivy_seconds=outcome.trivy_seconds)

    async def _scan(
        self,
        scan: Scan,
        options: ScanOptions,
        timeout_seconds: int,
        *,
        claim: asyncio.Task[bool] | None = None,
    ) -> _Outcome:
        assert self._trivy is not None
        with tempfile.TemporaryDirectory(prefix="secapi-scan-") as work:
            output = Path(work) / "report.json"
            command = build_scan_command(
                trivy_bin=str(self._trivy),
                image=scan.image,
                output=output,
                options=options,
                scanner=self._scanner,
                cache_dir=self._cache_dir,
                timeout_seconds=timeout_seconds,
                skip_db_update=True,
            )
            # Trivy unpacks layers under TMPDIR; this folder is removed after the scan.
            environment = {**self._environment, "TMPDIR": work}
            started = time.monotonic()
            try:
                process = await start_trivy(command, environment=environment, cwd=work)
            except OSError as error:
                return _Outcome(
                    reason=FailureReason.SCANNER_ERROR,
                    message=f"trivy could not be started ({self._trivy}): {error}",
                )
            if claim is None:
                self._processes[scan.id] = process
            else:
                # A handed-off run may lose its claim to a worker that took the scan from the
                # queue and runs it too. So it must not replace or remove that run's entry.
                self._processes.setdefault(scan.id, process)
                claim.add_done_callback(functools.partial(_kill_unless_claimed, process))
            try:
                result = await process.wait(timeout_seconds=timeout_seconds + KILL_GRACE_SECONDS)
                finished = time.monotonic()
            finally:
                if self._processes.get(scan.id) is process:
                    del self._processes[scan.id]

            if result.timed_out:
                return _Outcome(
                    reason=FailureReason.TIMEOUT,
                    message=f"the scan did not finish within its time limit of {timeout_seconds} seconds "
                    "and was stopped; ask for a longer timeout_seconds (this server allows up to "
                    f"{self._scanner.max_timeout_seconds}) or check that the registry answers",
                )
            if result.killed:
                return _Outcome(reason=FailureReason.INTERRUPTED, message="the scan was stopped")
            if result.returncode != 0:
                reason, message = classify_trivy_failure(
                    result.stderr,
                    result.returncode if result.returncode is not None else -1,
                    secrets=secret_values(environment),
                )
                return _Outcome(reason=reason, message=message)
            outcome = await self._read_report(output)
            outcome.trivy_seconds = round(finished - started, 3)
            return outcome

    async def _read_report(self, output: Path) -> _Outcome:
        return await asyncio.to_thread(_load_report, output, self._scanner.max_report_bytes)

    async def _trivy_version(self) -> TrivyVersion | None:
        """Return Trivy's version and DB date, probed again after each DB download."""
        assert self._trivy is not None and self._database is not None
        if self._version is not None and self._version_generation == self._database.generation:
            return self._version
        try:
            self._version = await probe_version(
                trivy_bin=str(self._trivy),
                cache_dir=self._cache_dir,
                environment=self._environment,
            )
            self._version_generation = self._database.generation
        except (OSError, RuntimeError) as error:
            log.warning("trivy version probe failed", error=str(error))
        return self._version

    async def _complete(
        self,
        scan_id: str,
        report: ParsedReport,
        version: TrivyVersion | None,
        *,
        trivy_seconds: float | None = None,
    ) -> None:
        if self._sync_engine is not None:
            stored = await asyncio.to_thread(
                self._store_sync,
                scan_id,
                report,
                trivy_version=version.version if version else None,
                db_updated_at=version.db_updated_at if version else None,
            )
            if stored:
                scan_ended(scan_id)
                self._log_completed(scan_id, report, trivy_seconds)
            else:
                log.warning(
                    "scan deleted or no longer held by this worker; results dropped",
                    scan_id=scan_id,
                )
            return
        async with self._session_factory() as session:
            scan = await session.get(Scan, scan_id)
            if scan is None:
                log.info("scan deleted while it ran; results dropped", scan_id=scan_id)
                return
            if scan.status != ScanStatus.RUNNING.value or scan.worker_id != self.worker_id:
                log.warning(
                    "scan no longer held by this worker; results dropped",
                    scan_id=scan_id,
                    status=scan.status,
                )
                return
            stored = await store_results(
                session,
                scan=scan,
                report=report,
                trivy_version=version.version if version else None,
                db_updated_at=version.db_updated_at if version else None,
            )
            await session.commit()
        scan_ended(scan_id)
        if stored:
            self._log_completed(scan_id, report, trivy_seconds)

    def _store_sync(
        self,
        scan_id: str,
        report: ParsedReport,
        *,
        trivy_version: str | None,
        db_updated_at: datetime | None,
    ) -> bool:
        """Store a report and commit on the synchronous engine (blocking; run it in a thread)."""
        assert self._sync_engine is not None
        with self._sync_engine.connect() as connection:
            stored = store_results_sync(
                connection,
                scan_id=scan_id,
                worker_id=self.worker_id,
                report=report,
                trivy_version=trivy_version,
                db_updated_at=db_updated_at,
            )
            if stored:
                connection.commit()
            else:
                connection.rollback()
            return stored

    @staticmethod
    def _log_completed(scan_id: str, report: ParsedReport, trivy_seconds: float | None) -> None:
        summary = report.summary
        log.info(
            "scan completed",
            scan_id=scan_id,
            trivy_seconds=trivy_seconds,
            critical=summary.critical,
            high=summary.high,
            total=summary.total,
            secrets=summary.secrets,
        )

    async def _fail(self, scan_id: str, reason: FailureReason, message: str) -> None:
        try:
            async with self._session_factory() as session:
                await repository.mark_failed(
                    session,
                    scan_id=scan_id,
                    reason=reason.value,
                    message=message,
                    worker_id=self.worker_id,
                )
                await session.commit()
            scan_ended(scan_id)
        except (SQLAlchemyError, OSError) as error:
            # The row stays running; housekeeping reclaims it after its time limit.
            log.error("recording a scan failure failed", scan_id=scan_id, error=str(error))

    # -- housekeeping ----------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while not self._stopping:
            try:
                await self._fail_expired_pending()
                await self._recover_orphans(all_hosts=True)
            except (SQLAlchemyError, OSError) as error:
                log.warning("scan housekeeping failed; retrying", error=str(error))
            await asyncio.sleep(self._housekeeping_seconds)

    async def _fail_expired_pending(self) -> None:
        seconds = self._scanner.queue_timeout_seconds
        async with self._session_factory() as session:
            failed = await repository.fail_expired_pending(
                session,
                executor=EXECUTOR_NAME,
                created_before=utcnow() - timedelta(seconds=seconds),
                reason=FailureReason.QUEUE_TIMEOUT.value,
                message=f"the scan waited in the queue for more than {seconds} seconds without "
                "starting; the server is busy, so submit it again later",
            )
            await session.commit()
        for scan_id in failed:
            log.warning("scan failed", scan_id=scan_id, reason=FailureReason.QUEUE_TIMEOUT.value)

    def _overdue(self, scan: Scan, now: datetime) -> bool:
        if scan.started_at is None:
            return True
        try:
            options = ScanOptions.model_validate(scan.options or {})
        except ValidationError:
            return True
        limit = effective_timeout(options, self._scanner) + ORPHAN_GRACE_SECONDS
        return now > scan.started_at + timedelta(seconds=limit)

    async def _recover_orphans(self, *, all_hosts: bool) -> None:
        """Re-queue (or, past MAX_ATTEMPTS, fail) running scans whose worker is gone."""
        now = utcnow()
        async with self._session_factory() as session:
            for scan in await repository.running_scans(session, executor=EXECUTOR_NAME):
                if scan.worker_id in _LIVE_WORKERS:
                    continue
                orphaned = is_dead_local_worker(scan.worker_id) or (
                    all_hosts and self._overdue(scan, now)
                )
                if not orphaned:
                    continue
                status = await repository.requeue_or_fail(
                    session,
                    scan=scan,
                    max_attempts=MAX_ATTEMPTS,
                    reason=FailureReason.INTERRUPTED.value,
                    message=f"the scan was interrupted {scan.attempts} times because the server "
                    "running it stopped; submit it again",
                )
                if status:
                    log.warning(
                        "orphaned scan recovered",
                        scan_id=scan.id,
                        previous_worker=scan.worker_id,
                        status=status,
                    )
            await session.commit()
        if all_hosts is False:
            self._wake_workers()

    async def _release_running(self) -> None:
        async with self._session_factory() as session:
            released = await repository.release_worker_scans(session, worker_id=self.worker_id)
            await session.commit()
        if released:
            log.info("running scans returned to the queue", count=released)
