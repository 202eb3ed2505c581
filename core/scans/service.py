"""The scan service: what the API's routes call to submit, read and delete scans.

Every read takes the calling user, and a scan of another user is reported as
not found, exactly like a scan that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from secapi.core.audit import Actor, AuditAction, AuditOutcome, AuditRecord, add_event
from secapi.core.db.models import Finding, FindingKind, Scan, ScanStatus, User
from secapi.core.errors import (
    InvalidInputError,
    NotFoundError,
    QuotaExceededError,
    ServiceUnavailableError,
)
from secapi.core.executors.base import Executor
from secapi.core.pagination import Page, page_offset
from secapi.core.scans import repository
from secapi.core.scans.documents import DocumentCache
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.reasons import FailureReason
from secapi.core.scans.reference import check_scannable, parse_reference
from secapi.core.scans.repository import ACTIVE_STATUSES
from secapi.core.scans.store import read_results_document
from secapi.core.scans.waiting import waits_ended, watch_scan
from secapi.core.settings import Settings, Tier

log = structlog.get_logger(__name__)

# Retry-After, in seconds, for a client over its concurrent-scan limit.
QUOTA_RETRY_AFTER_SECONDS = 30
# A lock per user with a submission under way; an entry goes when no one holds its lock.
_SUBMIT_LOCKS: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


class ScanService:
    """Scans of one request.

    ``submit`` and ``delete`` own their unit of work and commit; the reads
    never commit.
    """

    def __init__(
        self,
        session: AsyncSession,
        settings: Settings,
        executor: Executor,
        *,
        documents: DocumentCache | None = None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._executor = executor
        self._documents = documents

    async def _add_success_event(
        self,
        actor: Actor,
        action: AuditAction,
        scan_id: str,
        *,
        details: dict[str, str] | None = None,
    ) -> None:
        """Add a successful action's audit event to the session's open transaction."""
        record = AuditRecord(
            action,
            AuditOutcome.SUCCESS,
            resource_type="scan",
            resource_id=scan_id,
            details=details or {},
        )
        await add_event(self._session, actor=actor, record=record)

    def _not_found(self, scan_id: str) -> NotFoundError:
        return NotFoundError(f"scan {scan_id!r} not found; list your scans with GET /api/v1/scans")

    async def submit(
        self, *, user: User, image: str, options: ScanOptions, actor: Actor | None = None
    ) -> Scan:
        """Validate and queue a scan, then hand it to the executor.

        With ``actor``, the ``scan.submit`` audit event is written in the
        transaction that creates the scan, so neither exists without the other.

        Raises InvalidInputError for a reference that is invalid or that Trivy
        cannot pull, or for a timeout above the server's maximum. Raises
        QuotaExceededError when the user has as many scans pending or running
        as the tier allows. Raises ServiceUnavailableError when the executor
        cannot take the scan, after failing the row with ExecutorUnavailable.
        """
        check_scannable(parse_reference(image))
        scanner = self._settings.scanner
        if (
            options.timeout_seconds is not None
            and options.timeout_seconds > scanner.max_timeout_seconds
        ):
            raise InvalidInputError(
                f"timeout_seconds {options.timeout_seconds} is more than this server's maximum "
                f"of {scanner.max_timeout_seconds} seconds, set by "
                f"SECAPI_SCANNER__MAX_TIMEOUT_SECONDS; ask for at most "
                f"{scanner.max_timeout_seconds}, or leave timeout_seconds out for the default "
                f"of {min(scanner.timeout_seconds, scanner.max_timeout_seconds)}",
                field="timeout_seconds",
                value=str(options.timeout_seconds),
            )

        limits = self._settings.tiers.for_tier(Tier(user.tier))
        async with self._one_submit_at_a_time(user.id, enabled=bool(limits.concurrent_scans)):
            if limits.concurrent_scans:
                active = await repository.count_active_scans(self._session, user_id=user.id)
                if active >= limits.concurrent_scans:
                    raise QuotaExceededError(
                        f"you have {active} scans pending or running, the most your "
                        f"{user.tier} tier allows at once ({limits.concurrent_scans}); wait "
                        "for one to finish or delete one",
                        limit=limits.concurrent_scans,
                        remaining=0,
                        reset_at=int(time.time()) + QUOTA_RETRY_AFTER_SECONDS,
                        retry_after=QUOTA_RETRY_AFTER_SECONDS,
                    )

            scan = repository.new_scan(
                user_id=user.id,
                image=image,
                options=options.model_dump(mode="json"),
                priority=limits.queue_priority,
                executor=self._executor.name,
            )
            # An idle executor starts the scan now, so the commit below overlaps the scan.
            early = self._executor.start_before_commit(scan)
            try:
                self._session.add(scan)
                if actor is not None:
                    await self._add_success_event(
                        actor, AuditAction.SCAN_SUBMIT, scan.id, details={"image": image}
                    )
                await self._session.commit()
            except BaseException:
                if early is not None:
                    early.abandon()
                raise
        log.info("scan submitted", scan_id=scan.id, user_id=user.id, executor=self._executor.name)
        if early is not None:
            early.confirm()
            return scan

        try:
            await self._executor.submit(scan)
        except ServiceUnavailableError as error:
            await repository.mark_failed(
                self._session,
                scan_id=scan.id,
                reason=FailureReason.EXECUTOR_UNAVAILABLE.value,
                message=error.message,
            )
            await self._session.commit()
            log.error("executor rejected the scan", scan_id=scan.id, error=error.message)
            raise
        return scan

    @contextlib.asynccontextmanager
    async def _one_submit_at_a_time(self, user_id: str, *, enabled: bool) -> AsyncIterator[None]:
        """Serialise the user's submissions from the count of active scans to the commit.

        Without it, submissions sent at once all count the same active scans and all
        pass the concurrent-scan limit. A lock in this process covers the embedded
        mode; on PostgreSQL the user's row is also locked until the commit, which
        covers several API processes.
        """
        if not enabled:
            yield
            return
        lock = _SUBMIT_LOCKS.get(user_id)
        if lock is None:
            lock = _SUBMIT_LOCKS[user_id] = asyncio.Lock()
        if lock.locked():
            # Ends the session's read-only transaction, so a waiter keeps no pooled
            # connection: waiters holding them all would leave none for the lock's holder.
            await self._session.commit()
        async with lock:
            await repository.lock_user(self._session, user_id=user_id)
            yield

    async def get(self, *, user: User, scan_id: str) -> Scan:
        scan = await repository.get_user_scan(self._session, user_id=user.id, scan_id=scan_id)
        if scan is None:
            raise self._not_found(scan_id)
        return scan

    async def get_with_results(
        self, *, user: User, scan_id: str, with_results: bool
    ) -> tuple[Scan, bytes | None]:
        """Return the scan and, when asked and stored, its results document (uncompressed JSON).

        A document in the cache costs one small query, for the scan row and
        its owner. Otherwise one query reads both, and the document is cached.
        """
        cache = self._documents if with_results else None
        cached = cache.get(scan_id) if cache is not None else None
        if cached is not None:
            return await self.get(user=user, scan_id=scan_id), cached

        found = await repository.get_user_scan_and_results(
            self._session, user_id=user.id, scan_id=scan_id, with_results=with_results
        )
        if found is None:
            raise self._not_found(scan_id)
        scan, compressed = found
        if compressed is None:
            return scan, None
        document = gzip.decompress(compressed)
        if cache is not None:
            cache.put(scan_id, document)
        return scan, document

    async def wait_for_end(
        self,
        *,
        user: User,
        scan_id: str,
        seconds: float,
        recheck_seconds: float = 1.0,
        before_waiting: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Return when the user's scan is completed or failed, or after ``seconds``.

        Owns its transactions: it ends the session's transaction (the caller
        has nothing pending in it) and holds no database connection while it
        waits. A notice from the local executor in this process wakes it at
        once, and so does the start of the server's shutdown, which ends the
        wait with the scan still active. Scans that end elsewhere are seen by a status read every
        ``recheck_seconds``. Raises NotFoundError for a scan that is not the user's.
        ``before_waiting`` runs once, when the scan is found still pending or
        running, before the wait: writes there stay off the path from the
        scan's end to the answer.
        """
        deadline = time.monotonic() + seconds
        waited = False
        with watch_scan(scan_id) as ended:
            while True:
                # Cleared before the read: a notice after the read sets it again and is not lost.
                ended.clear()
                status = await repository.user_scan_status(
                    self._session, user_id=user.id, scan_id=scan_id
                )
                await self._session.commit()
                if status is None:
                    raise self._not_found(scan_id)
                remaining = deadline - time.monotonic()
                # A stopping server returns at once rather than hold up its shutdown.
                if status not in ACTIVE_STATUSES or remaining <= 0 or waits_ended():
                    return
                if not waited and before_waiting is not None:
                    await before_waiting()
                    # The write may have taken a while: wait no longer than the caller allowed.
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                waited = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), timeout=min(remaining, recheck_seconds))
                if ended.is_set():
                    # The executor sends the notice after it committed the scan's end.
                    return

    async def list(
        self,
        *,
        user: User,
        statuses: Sequence[ScanStatus] | None,
        page: int,
        page_size: int,
    ) -> Page[Scan]:
        """Return one page of the user's scans in ``statuses`` (None: any status), newest first."""
        items, total = await repository.list_user_scans(
            self._session,
            user_id=user.id,
            statuses=statuses,
            offset=page_offset(page=page, page_size=page_size),
            limit=page_size,
        )
        return Page(items=items, total=total, page=page, page_size=page_size)

    async def delete(self, *, user: User, scan_id: str, actor: Actor | None = None) -> None:
        """Delete the scan and its results; a pending or running scan is cancelled first.

        With ``actor``, the ``scan.delete`` audit event is written in the
        transaction that deletes the scan.
        """
        scan = await self.get(user=user, scan_id=scan_id)
        if not await repository.delete_scan(self._session, scan_id=scan.id):
            raise self._not_found(scan_id)
        if actor is not None:
            await self._add_success_event(actor, AuditAction.SCAN_DELETE, scan.id)
        await self._session.commit()
        # Cancelled after the commit, so the worker finds no row to record the kill in.
        # A finished scan is cancelled too: the kubernetes executor deletes its Scan resource.
        await self._executor.cancel(scan)
        log.info("scan deleted", scan_id=scan_id, user_id=user.id)

    async def results_document(self, *, scan: Scan) -> bytes | None:
        """Return the stored results document (uncompressed JSON), None when there is none."""
        return await read_results_document(self._session, scan_id=scan.id)

    async def findings(
        self,
        *,
        user: User,
        scan_id: str,
        kind: FindingKind,
        severity: str | Sequence[str] | None,
        page: int,
        page_size: int,
    ) -> Page[Finding]:
        """Return one page of a scan's findings of one kind, of one or several severities."""
        scan = await self.get(user=user, scan_id=scan_id)
        items, total = await repository.findings_page(
            self._session,
            scan_id=scan.id,
            kind=kind,
            severity=severity,
            offset=page_offset(page=page, page_size=page_size),
            limit=page_size,
        )
        return Page(items=items, total=total, page=page, page_size=page_size)

    async def queue_position(self, *, scan: Scan) -> int | None:
        """Return the scan's 1-based place among pending scans, None unless it is pending."""
        return await repository.queue_position(self._session, scan=scan)
