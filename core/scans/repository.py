"""Every query on scans and their findings, for PostgreSQL and SQLite alike.

Functions take an AsyncSession and never commit; the caller owns the unit of
work. State changes are conditional UPDATEs (``... WHERE status = 'pending'``)
whose row count tells whether this caller won, so two workers, or a worker
and a user deleting the scan, never both act on one row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession

from secapi.core.db.models import (
    Finding,
    FindingKind,
    Scan,
    ScanReport,
    ScanStatus,
    User,
    new_id,
    utcnow,
)

ACTIVE_STATUSES = (ScanStatus.PENDING.value, ScanStatus.RUNNING.value)
# Candidates read per claim attempt; more than one, so losing a race to
# another worker does not mean a second round trip.
CLAIM_CANDIDATES = 4


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def new_scan(
    *, user_id: str, image: str, options: dict[str, Any], priority: int, executor: str
) -> Scan:
    """Return a pending scan with its id and created_at set, not yet added to a session."""
    return Scan(
        id=new_id(),
        user_id=user_id,
        image=image,
        options=options,
        priority=priority,
        executor=executor,
        status=ScanStatus.PENDING.value,
        attempts=0,
        created_at=utcnow(),
    )


async def add_scan(
    session: AsyncSession,
    *,
    user_id: str,
    image: str,
    options: dict[str, Any],
    priority: int,
    executor: str,
) -> Scan:
    """Insert a pending scan and flush."""
    scan = new_scan(
        user_id=user_id, image=image, options=options, priority=priority, executor=executor
    )
    session.add(scan)
    await session.flush()
    return scan


async def get_scan(session: AsyncSession, scan_id: str) -> Scan | None:
    return await session.get(Scan, scan_id)


async def get_user_scan(session: AsyncSession, *, user_id: str, scan_id: str) -> Scan | None:
    """Return the scan if it exists and belongs to the user."""
    return await session.scalar(select(Scan).where(Scan.id == scan_id, Scan.user_id == user_id))


async def get_user_scan_and_results(
    session: AsyncSession, *, user_id: str, scan_id: str, with_results: bool
) -> tuple[Scan, bytes | None] | None:
    """Return the user's scan and, when asked, its gzip'd results document, in one query."""
    if not with_results:
        scan = await get_user_scan(session, user_id=user_id, scan_id=scan_id)
        return None if scan is None else (scan, None)
    row = (
        await session.execute(
            select(Scan, ScanReport.results_gzip)
            .outerjoin(ScanReport, ScanReport.scan_id == Scan.id)
            .where(Scan.id == scan_id, Scan.user_id == user_id)
        )
    ).first()
    return None if row is None else (row[0], row[1])


async def user_scan_status(session: AsyncSession, *, user_id: str, scan_id: str) -> str | None:
    """Return the status of the user's scan, None when there is no such scan of the user."""
    return await session.scalar(
        select(Scan.status).where(Scan.id == scan_id, Scan.user_id == user_id)
    )


async def list_user_scans(
    session: AsyncSession,
    *,
    user_id: str,
    statuses: Sequence[ScanStatus] | None,
    offset: int,
    limit: int,
) -> tuple[list[Scan], int]:
    """Return one page of the user's scans, newest first, and the count of all that match.

    ``statuses`` None means every status.
    """
    conditions = [Scan.user_id == user_id]
    if statuses is not None:
        conditions.append(Scan.status.in_([status.value for status in statuses]))
    total = await session.scalar(select(func.count()).select_from(Scan).where(*conditions))
    result = await session.scalars(
        select(Scan)
        .where(*conditions)
        .order_by(Scan.created_at.desc(), Scan.id.desc())
        .offset(offset)
        .limit(limit)
    )
    return list(result), int(total or 0)


async def lock_user(session: AsyncSession, *, user_id: str) -> None:
    """Lock the user's row until the transaction ends; a no-op on SQLite, which has no row locks."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(select(User.id).where(User.id == user_id).with_for_update())


async def count_active_scans(session: AsyncSession, *, user_id: str) -> int:
    """Return how many of the user's scans are pending or running."""
    total = await session.scalar(
        select(func.count())
        .select_from(Scan)
        .where(Scan.user_id == user_id, Scan.status.in_(ACTIVE_STATUSES))
    )
    return int(total or 0)


async def delete_scan(session: AsyncSession, *, scan_id: str) -> bool:
    """Delete a scan; return False when it was gone already.

    Its findings and report go with it by ON DELETE CASCADE (the SQLite
    engine turns foreign keys on for every connection).
    """
    result = await session.execute(delete(Scan).where(Scan.id == scan_id))
    return _rowcount(result) == 1


def _queue_order() -> tuple[Any, ...]:
    return (Scan.priority.desc(), Scan.created_at.asc(), Scan.id.asc())


async def mark_running(
    session: AsyncSession, *, scan_id: str, worker_id: str, started_at: datetime
) -> bool:
    """Move a pending scan to running for ``worker_id``; return False if it was not pending."""
    result = await session.execute(
        update(Scan)
        .where(Scan.id == scan_id, Scan.status == ScanStatus.PENDING.value)
        .values(
            status=ScanStatus.RUNNING.value,
            worker_id=worker_id,
            started_at=started_at,
            attempts=Scan.attempts + 1,
        )
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


async def claim_next_pending(
    session: AsyncSession, *, executor: str, worker_id: str
) -> Scan | None:
    """Claim the next pending scan (highest priority, then oldest) and mark it running.

    Race-safe on both databases. On PostgreSQL the candidates are read with
    FOR UPDATE SKIP LOCKED, so concurrent claimers skip each other's rows.
    SQLite has no FOR UPDATE and serialises writers, so there the conditional
    UPDATE decides, and a lost race moves on to the next candidate. The
    caller commits.
    """
    while True:
        candidates = list(
            await session.scalars(
                select(Scan.id)
                .where(Scan.status == ScanStatus.PENDING.value, Scan.executor == executor)
                .order_by(*_queue_order())
                .limit(CLAIM_CANDIDATES)
                .with_for_update(skip_locked=True)
            )
        )
        if not candidates:
            return None
        for scan_id in candidates:
            if await mark_running(
                session, scan_id=scan_id, worker_id=worker_id, started_at=utcnow()
            ):
                scan = await session.get(Scan, scan_id, populate_existing=True)
                if scan is not None:
                    return scan


async def mark_failed(
    session: AsyncSession,
    *,
    scan_id: str,
    reason: str,
    message: str,
    worker_id: str | None = None,
) -> bool:
    """Fail a scan that has not ended; return False when it had ended or is gone.

    With ``worker_id``, only a scan still held by that worker is failed, so a
    worker never overwrites a row that was re-queued and claimed elsewhere.
    """
    conditions = [Scan.id == scan_id, Scan.status.in_(ACTIVE_STATUSES)]
    if worker_id is not None:
        conditions.append(Scan.worker_id == worker_id)
    result = await session.execute(
        update(Scan)
        .where(*conditions)
        .values(
            status=ScanStatus.FAILED.value,
            reason=reason,
            message=message,
            completed_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


async def queue_position(session: AsyncSession, *, scan: Scan) -> int | None:
    """Return the 1-based place of a pending scan in its executor's queue, None otherwise."""
    if scan.status != ScanStatus.PENDING.value:
        return None
    ahead = await session.scalar(
        select(func.count())
        .select_from(Scan)
        .where(
            Scan.status == ScanStatus.PENDING.value,
            Scan.executor == scan.executor,
            or_(
                Scan.priority > scan.priority,
                and_(Scan.priority == scan.priority, Scan.created_at < scan.created_at),
                and_(
                    Scan.priority == scan.priority,
                    Scan.created_at == scan.created_at,
                    Scan.id < scan.id,
                ),
            ),
        )
    )
    return int(ahead or 0) + 1


async def running_scans(session: AsyncSession, *, executor: str) -> Sequence[Scan]:
    """Return the scans of an executor that are marked running, by any worker."""
    result = await session.scalars(
        select(Scan).where(Scan.status == ScanStatus.RUNNING.value, Scan.executor == executor)
    )
    return list(result)


async def requeue_or_fail(
    session: AsyncSession,
    *,
    scan: Scan,
    max_attempts: int,
    message: str,
    reason: str,
) -> str:
    """Put a scan left running by a dead worker back in the queue, or fail it.

    A scan that has been claimed ``max_attempts`` times already fails with
    ``reason``, so an image that crashes its worker cannot loop forever.
    Returns the new status, or "" when the row changed in the meantime.
    """
    base = update(Scan).where(
        Scan.id == scan.id,
        Scan.status == ScanStatus.RUNNING.value,
        Scan.worker_id == scan.worker_id,
    )
    if scan.attempts < max_attempts:
        result = await session.execute(
            base.values(
                status=ScanStatus.PENDING.value, worker_id=None, started_at=None
            ).execution_options(synchronize_session=False)
        )
        return ScanStatus.PENDING.value if _rowcount(result) == 1 else ""
    result = await session.execute(
        base.values(
            status=ScanStatus.FAILED.value,
            reason=reason,
            message=message,
            completed_at=utcnow(),
        ).execution_options(synchronize_session=False)
    )
    return ScanStatus.FAILED.value if _rowcount(result) == 1 else ""


async def release_worker_scans(session: AsyncSession, *, worker_id: str) -> int:
    """Return a stopping worker's running scans to the queue, not counting the attempt."""
    result = await session.execute(
        update(Scan)
        .where(Scan.status == ScanStatus.RUNNING.value, Scan.worker_id == worker_id)
        .values(
            status=ScanStatus.PENDING.value,
            worker_id=None,
            started_at=None,
            attempts=Scan.attempts - 1,
        )
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result)


async def fail_expired_pending(
    session: AsyncSession, *, executor: str, created_before: datetime, reason: str, message: str
) -> list[str]:
    """Fail the scans that have waited in the queue since before ``created_before``."""
    expired = list(
        await session.scalars(
            select(Scan.id).where(
                Scan.status == ScanStatus.PENDING.value,
                Scan.executor == executor,
                Scan.created_at < created_before,
            )
        )
    )
    failed = []
    for scan_id in expired:
        result = await session.execute(
            update(Scan)
            .where(Scan.id == scan_id, Scan.status == ScanStatus.PENDING.value)
            .values(
                status=ScanStatus.FAILED.value,
                reason=reason,
                message=message,
                completed_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
        if _rowcount(result) == 1:
            failed.append(scan_id)
    return failed


async def findings_page(
    session: AsyncSession,
    *,
    scan_id: str,
    kind: FindingKind,
    severity: str | Sequence[str] | None,
    offset: int,
    limit: int,
) -> tuple[list[Finding], int]:
    """Return one page of a scan's findings of one kind in report order, and their count.

    ``severity`` is one severity or several to keep, and None keeps every finding.
    """
    conditions = [Finding.scan_id == scan_id, Finding.kind == kind.value]
    if isinstance(severity, str):
        conditions.append(Finding.severity == severity)
    elif severity is not None:
        conditions.append(Finding.severity.in_(severity))
    total = await session.scalar(select(func.count()).select_from(Finding).where(*conditions))
    result = await session.scalars(
        select(Finding).where(*conditions).order_by(Finding.ordinal).offset(offset).limit(limit)
    )
    return list(result), int(total or 0)
