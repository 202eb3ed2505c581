"""Scan queries: the queue order, race-safe claims, listing, orphans and deadlines."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.db.models import Scan, ScanStatus, utcnow
from secapi.core.scans import repository
from secapi.core.settings import Settings
from tests.scans.conftest import Database, UserFactory

SessionFactory = async_sessionmaker[AsyncSession]


async def add(
    session_factory: SessionFactory,
    user_id: str,
    *,
    priority: int = 0,
    executor: str = "local",
    age_seconds: float = 0,
    image: str = "img:1",
) -> str:
    async with session_factory() as session:
        scan = await repository.add_scan(
            session, user_id=user_id, image=image, options={}, priority=priority, executor=executor
        )
        if age_seconds:
            scan.created_at = utcnow() - timedelta(seconds=age_seconds)
        await session.commit()
        return scan.id


async def claim(session_factory: SessionFactory, worker_id: str = "worker") -> Scan | None:
    async with session_factory() as session:
        scan = await repository.claim_next_pending(session, executor="local", worker_id=worker_id)
        await session.commit()
        return scan


async def status_of(session_factory: SessionFactory, scan_id: str) -> Scan:
    async with session_factory() as session:
        scan = await session.get(Scan, scan_id)
        assert scan is not None
        return scan


async def drain(session_factory: SessionFactory) -> None:
    """End every pending or running scan left by earlier tests of the module."""
    async with session_factory() as session:
        await session.execute(
            update(Scan)
            .where(Scan.status.in_(["pending", "running"]))
            .values(status="failed", reason="Interrupted", message="ended by the test")
        )
        await session.commit()


async def test_claim_order_is_priority_then_age(
    session_factory: SessionFactory, make_user: UserFactory
) -> None:
    await drain(session_factory)
    user = await make_user()
    low_old = await add(session_factory, user.id, priority=0, age_seconds=60)
    high_new = await add(session_factory, user.id, priority=10)
    high_old = await add(session_factory, user.id, priority=10, age_seconds=30)
    low_new = await add(session_factory, user.id, priority=0)
    await add(session_factory, user.id, priority=99, executor="kubernetes")

    order = []
    while (scan := await claim(session_factory)) is not None:
        order.append(scan.id)

    assert order == [high_old, high_new, low_old, low_new]


async def test_claim_marks_running(session_factory: SessionFactory, make_user: UserFactory) -> None:
    await drain(session_factory)
    user = await make_user()
    scan_id = await add(session_factory, user.id)

    claimed = await claim(session_factory, "worker-a")

    assert claimed is not None and claimed.id == scan_id
    stored = await status_of(session_factory, scan_id)
    assert stored.status == ScanStatus.RUNNING
    assert stored.worker_id == "worker-a"
    assert stored.started_at is not None
    assert stored.attempts == 1
    assert await claim(session_factory) is None


async def test_concurrent_claims_take_each_scan_once(
    session_factory: SessionFactory, make_user: UserFactory
) -> None:
    await drain(session_factory)
    user = await make_user()
    scan_ids = {await add(session_factory, user.id) for _ in range(12)}

    async def claim_all(worker: str) -> list[str]:
        taken = []
        while (scan := await claim(session_factory, worker)) is not None:
            taken.append(scan.id)
            await asyncio.sleep(0)
        return taken

    results = await asyncio.gather(*(claim_all(f"worker-{n}") for n in range(6)))

    taken = [scan_id for result in results for scan_id in result]
    assert sorted(taken) == sorted(scan_ids)
    assert len(set(taken)) == len(taken)


async def test_queue_position(session_factory: SessionFactory, make_user: UserFactory) -> None:
    await drain(session_factory)
    user = await make_user()
    first = await add(session_factory, user.id, age_seconds=20)
    second = await add(session_factory, user.id, age_seconds=10)
    urgent = await add(session_factory, user.id, priority=20)
    other_executor = await add(session_factory, user.id, executor="kubernetes")

    async with session_factory() as session:
        positions = {}
        for scan_id in (first, second, urgent, other_executor):
            scan = await session.get(Scan, scan_id)
            assert scan is not None
            positions[scan_id] = await repository.queue_position(session, scan=scan)

    assert positions == {urgent: 1, first: 2, second: 3, other_executor: 1}

    claimed = await claim(session_factory)
    assert claimed is not None and claimed.id == urgent
    async with session_factory() as session:
        running = await session.get(Scan, urgent)
        waiting = await session.get(Scan, second)
        assert running is not None and waiting is not None
        assert await repository.queue_position(session, scan=running) is None
        assert await repository.queue_position(session, scan=waiting) == 2


async def test_list_is_newest_first_and_paged(
    session_factory: SessionFactory, make_user: UserFactory
) -> None:
    user = await make_user()
    other = await make_user()
    ids = [await add(session_factory, user.id, age_seconds=100 - n) for n in range(5)]
    await add(session_factory, other.id)
    async with session_factory() as session:
        assert await repository.mark_failed(session, scan_id=ids[1], reason="Timeout", message="-")
        await session.commit()

    async with session_factory() as session:
        page_one, total = await repository.list_user_scans(
            session, user_id=user.id, statuses=None, offset=0, limit=2
        )
        page_three, _ = await repository.list_user_scans(
            session, user_id=user.id, statuses=None, offset=4, limit=2
        )
        failed, failed_total = await repository.list_user_scans(
            session, user_id=user.id, statuses=[ScanStatus.FAILED], offset=0, limit=10
        )
        pending, pending_total = await repository.list_user_scans(
            session, user_id=user.id, statuses=[ScanStatus.PENDING], offset=0, limit=10
        )
        either, either_total = await repository.list_user_scans(
            session,
            user_id=user.id,
            statuses=[ScanStatus.FAILED, ScanStatus.PENDING],
            offset=0,
            limit=3,
        )
        none, none_total = await repository.list_user_scans(
            session, user_id=user.id, statuses=[ScanStatus.COMPLETED], offset=0, limit=10
        )
        active = await repository.count_active_scans(session, user_id=user.id)

    assert total == 5
    assert [scan.id for scan in page_one] == [ids[4], ids[3]]
    assert [scan.id for scan in page_three] == [ids[0]]
    assert (failed_total, [scan.id for scan in failed]) == (1, [ids[1]])
    assert pending_total == 4
    assert {scan.id for scan in pending} == {ids[0], ids[2], ids[3], ids[4]}
    assert either_total == 5
    assert [scan.id for scan in either] == [ids[4], ids[3], ids[2]]
    assert (none_total, none) == (0, [])
    assert active == 4


async def test_get_by_owner_only(session_factory: SessionFactory, make_user: UserFactory) -> None:
    owner = await make_user()
    stranger = await make_user()
    scan_id = await add(session_factory, owner.id)

    async with session_factory() as session:
        mine = await repository.get_user_scan(session, user_id=owner.id, scan_id=scan_id)
        theirs = await repository.get_user_scan(session, user_id=stranger.id, scan_id=scan_id)
        missing = await repository.get_user_scan(session, user_id=owner.id, scan_id="no-such-id")

    assert mine is not None and mine.id == scan_id
    assert theirs is None
    assert missing is None


async def test_mark_failed_only_unfinished(
    session_factory: SessionFactory, make_user: UserFactory
) -> None:
    await drain(session_factory)
    user = await make_user()
    scan_id = await add(session_factory, user.id)
    claimed = await claim(session_factory, "worker-a")
    assert claimed is not None

    async with session_factory() as session:
        wrong_worker = await repository.mark_failed(
            session, scan_id=scan_id, reason="Timeout", message="-", worker_id="worker-b"
        )
        right_worker = await repository.mark_failed(
            session, scan_id=scan_id, reason="Timeout", message="too slow", worker_id="worker-a"
        )
        again = await repository.mark_failed(
            session, scan_id=scan_id, reason="ScannerError", message="-"
        )
        await session.commit()

    assert (wrong_worker, right_worker, again) == (False, True, False)
    scan = await status_of(session_factory, scan_id)
    assert (scan.status, scan.reason, scan.message) == ("failed", "Timeout", "too slow")
    assert scan.completed_at is not None


async def test_orphan_is_requeued_once_then_failed(
    session_factory: SessionFactory, make_user: UserFactory
) -> None:
    await drain(session_factory)
    user = await make_user()
    scan_id = await add(session_factory, user.id)

    outcomes = []
    for attempt in range(2):
        claimed = await claim(session_factory, f"dead-worker-{attempt}")
        assert claimed is not None and claimed.id == scan_id
        async with session_factory() as session:
            outcomes.append(
                await repository.requeue_or_fail(
                    session,
                    scan=claimed,
                    max_attempts=2,
                    reason="Interrupted",
                    message="the server stopped",
                )
            )
            await session.commit()

    assert outcomes == ["pending", "failed"]
    scan = await status_of(session_factory, scan_id)
    assert (scan.status, scan.reason, scan.attempts) == ("failed", "Interrupted", 2)


async def test_requeue_ignores_rows_changed_meanwhile(
    session_factory: SessionFactory, make_user: UserFactory
) -> None:
    await drain(session_factory)
    user = await make_user()
    await add(session_factory, user.id)
    claimed = await claim(session_factory, "worker-a")
    assert claimed is not None
    async with session_factory() as session:
        await session.execute(
            update(Scan).where(Scan.id == claimed.id).values(worker_id="worker-b")
        )
        await session.commit()

    async with session_factory() as session:
        outcome = await repository.requeue_or_fail(
            session, scan=claimed, max_attempts=2, reason="Interrupted", message="-"
        )
        await session.commit()

    assert outcome == ""
    assert (await status_of(session_factory, claimed.id)).status == ScanStatus.RUNNING


async def test_release_does_not_count_attempt(
    session_factory: SessionFactory, make_user: UserFactory
) -> None:
    await drain(session_factory)
    user = await make_user()
    scan_id = await add(session_factory, user.id)
    assert await claim(session_factory, "stopping-worker") is not None

    async with session_factory() as session:
        released = await repository.release_worker_scans(session, worker_id="stopping-worker")
        await session.commit()

    assert released == 1
    scan = await status_of(session_factory, scan_id)
    assert (scan.status, scan.worker_id, scan.started_at, scan.attempts) == (
        "pending",
        None,
        None,
        0,
    )


async def test_expired_pending_fails(
    session_factory: SessionFactory, make_user: UserFactory
) -> None:
    await drain(session_factory)
    user = await make_user()
    old = await add(session_factory, user.id, age_seconds=600)
    fresh = await add(session_factory, user.id)

    async with session_factory() as session:
        failed = await repository.fail_expired_pending(
            session,
            executor="local",
            created_before=utcnow() - timedelta(seconds=300),
            reason="QueueTimeout",
            message="waited too long",
        )
        await session.commit()

    assert failed == [old]
    assert (await status_of(session_factory, old)).reason == "QueueTimeout"
    assert (await status_of(session_factory, fresh)).status == ScanStatus.PENDING


async def test_user_lock_holds_other_connections(
    database: Database,
    session_factory: async_sessionmaker[AsyncSession],
    make_user: UserFactory,
) -> None:
    """The user row lock that serialises submissions also holds a second server's connections."""
    if database.backend != "postgresql":
        pytest.skip("SQLite has no row locks; its submissions are serialised in the process")
    user = await make_user()
    # An engine of its own, as another server process would have.
    other_engine = create_engine(Settings(database_url=database.url))
    try:
        async with session_factory() as first, create_session_factory(other_engine)() as second:
            await repository.lock_user(first, user_id=user.id)
            waiting = asyncio.create_task(repository.lock_user(second, user_id=user.id))
            await asyncio.sleep(0.5)
            second_blocked = not waiting.done()

            await first.commit()
            await asyncio.wait_for(waiting, timeout=10)
            await second.commit()
    finally:
        await other_engine.dispose()

    assert second_blocked
