"""The local executor end to end: real Trivy, the bed's registry and fixture DB, both databases."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog
import structlog.testing
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from secapi.core.audit import Actor
from secapi.core.db.models import FindingKind, Scan, ScanStatus, User, utcnow
from secapi.core.errors import QuotaExceededError, ServiceUnavailableError
from secapi.core.executors.base import create_executor
from secapi.core.executors.local import LocalExecutor
from secapi.core.scans import repository
from secapi.core.scans.go_runtime import local_memory_limit
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.service import ScanService
from secapi.core.settings import Settings
from tests.scans.conftest import ReportFactory, UserFactory, tiers
from tests.scans.servers import auth_registry, copy_image, silent_server, unused_port
from tests.testbed.fixture_images import load_catalog

SessionFactory = async_sessionmaker[AsyncSession]
ExecutorFactory = Callable[..., Awaitable[LocalExecutor]]
FINAL = (ScanStatus.COMPLETED.value, ScanStatus.FAILED.value)


@pytest_asyncio.fixture
async def start_executor(
    session_factory: SessionFactory,
) -> AsyncIterator[ExecutorFactory]:
    """Return a factory that starts a local executor for some settings; all stop afterwards."""
    started: list[LocalExecutor] = []

    async def start(settings: Settings) -> LocalExecutor:
        executor = LocalExecutor(
            settings, session_factory, poll_seconds=0.5, housekeeping_seconds=1
        )
        await executor.start()
        started.append(executor)
        return executor

    yield start
    for executor in started:
        await executor.stop()
    # End what this test left queued, so the next test's executor does not run it.
    async with session_factory() as session:
        await session.execute(
            update(Scan)
            .where(Scan.status.in_([ScanStatus.PENDING.value, ScanStatus.RUNNING.value]))
            .values(status=ScanStatus.FAILED.value, reason="Interrupted", message="test ended")
        )
        await session.commit()


async def submit(
    session_factory: SessionFactory,
    settings: Settings,
    executor: LocalExecutor,
    user: User,
    image: str,
    **options: Any,
) -> str:
    async with session_factory() as session:
        scan = await ScanService(session, settings, executor).submit(
            user=user, image=image, options=ScanOptions(**options)
        )
        return scan.id


async def add_running_scan(
    session_factory: SessionFactory, user: User, image: str, *, worker_id: str
) -> Scan:
    """Add a scan row that ``worker_id`` has claimed already, as another worker would."""
    async with session_factory() as session:
        scan = await repository.add_scan(
            session,
            user_id=user.id,
            image=image,
            options=ScanOptions().model_dump(mode="json"),
            priority=0,
            executor="local",
        )
        await repository.mark_running(
            session, scan_id=scan.id, worker_id=worker_id, started_at=utcnow()
        )
        await session.commit()
        return scan


async def wait_final(session_factory: SessionFactory, scan_id: str, *, within: float = 180) -> Scan:
    deadline = time.monotonic() + within
    while True:
        async with session_factory() as session:
            scan = await session.get(Scan, scan_id)
        assert scan is not None, f"scan {scan_id} disappeared"
        if scan.status in FINAL:
            return scan
        assert time.monotonic() < deadline, f"scan {scan_id} still {scan.status} after {within} s"
        await asyncio.sleep(0.25)


async def wait_status(session_factory: SessionFactory, scan_id: str, status: str) -> Scan:
    deadline = time.monotonic() + 60
    while True:
        async with session_factory() as session:
            scan = await session.get(Scan, scan_id)
        assert scan is not None
        if scan.status == status:
            return scan
        assert time.monotonic() < deadline, f"scan {scan_id} never became {status}"
        await asyncio.sleep(0.1)


async def stored_vulnerabilities(
    session_factory: SessionFactory,
    settings: Settings,
    executor: LocalExecutor,
    user: User,
    scan_id: str,
) -> set[tuple[str, str, str]]:
    found: set[tuple[str, str, str]] = set()
    async with session_factory() as session:
        service = ScanService(session, settings, executor)
        page = 1
        while True:
            result = await service.findings(
                user=user,
                scan_id=scan_id,
                kind=FindingKind.VULNERABILITY,
                severity=None,
                page=page,
                page_size=100,
            )
            for row in result.items:
                assert row.package_name is not None and row.installed_version is not None
                found.add((row.identifier, row.package_name, row.installed_version))
            if page * 100 >= result.total:
                return found
            page += 1


def trivy_vulnerabilities(path: Path) -> set[tuple[str, str, str]]:
    data = json.loads(path.read_text())
    return {
        (item["VulnerabilityID"], item["PkgName"], item["InstalledVersion"])
        for result in data.get("Results") or []
        for item in result.get("Vulnerabilities") or []
    }


def fixture_scans() -> list[tuple[str, dict[str, Any]]]:
    """Every fixture image (one entry per platform of an index) and its scan options."""
    scans = []
    for entry in load_catalog():
        if entry["kind"] == "image":
            scans.append((f"{entry['name']}:{entry['tag']}", {}))
        elif entry["kind"] == "index":
            for platform in entry["platforms"]:
                scans.append(
                    (f"{entry['name']}:{entry['tag']}", {"platform": platform["platform"]})
                )
    return scans


@pytest.mark.parametrize(("image", "options"), fixture_scans())
async def test_fixture_scan_matches_trivy(
    image: str,
    options: dict[str, Any],
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
    trivy_report: ReportFactory,
) -> None:
    settings = make_settings()
    executor = await start_executor(settings)
    user = await make_user()
    reference = f"{registry}/{image}"

    scan_id = await submit(session_factory, settings, executor, user, reference, **options)
    scan = await wait_final(session_factory, scan_id)

    assert scan.status == ScanStatus.COMPLETED, (scan.reason, scan.message)
    expected = trivy_vulnerabilities(trivy_report(reference, options=ScanOptions(**options)))
    assert (
        await stored_vulnerabilities(session_factory, settings, executor, user, scan_id) == expected
    )
    raw = json.loads(trivy_report(reference, options=ScanOptions(**options)).read_text())
    raw_count = sum(len(result.get("Vulnerabilities") or []) for result in raw.get("Results") or [])
    assert scan.critical + scan.high + scan.medium + scan.low + scan.unknown == raw_count
    assert scan.trivy_version == "0.74.0"
    assert scan.db_updated_at is not None
    assert scan.started_at is not None and scan.completed_at is not None
    async with session_factory() as session:
        document = await ScanService(session, settings, executor).results_document(scan=scan)
    assert document is not None
    results = json.loads(document)
    assert (
        results["summary"]["total"]
        == scan.critical + scan.high + scan.medium + scan.low + scan.unknown
    )
    assert {
        (v["id"], v["package"], v["installed_version"]) for v in results["vulnerabilities"]
    } == expected


async def test_missing_image_fails(
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    settings = make_settings()
    executor = await start_executor(settings)
    user = await make_user()

    scan_id = await submit(
        session_factory, settings, executor, user, f"{registry}/fixtures/alpine:no-such-tag"
    )
    scan = await wait_final(session_factory, scan_id, within=60)

    assert scan.status == ScanStatus.FAILED
    assert scan.reason == "ImageNotFound"
    assert scan.message is not None and "MANIFEST_UNKNOWN" in scan.message
    assert scan.completed_at is not None


async def test_unreachable_registry_fails(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    settings = make_settings()
    executor = await start_executor(settings)
    user = await make_user()

    scan_id = await submit(
        session_factory, settings, executor, user, f"127.0.0.1:{unused_port()}/app:1"
    )
    scan = await wait_final(session_factory, scan_id, within=60)

    assert (scan.status, scan.reason) == ("failed", "RegistryUnreachable")


async def test_large_scan_is_stored_and_paged(
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    settings = make_settings()
    executor = await start_executor(settings)
    user = await make_user()

    scan_id = await submit(
        session_factory, settings, executor, user, f"{registry}/fixtures/many-findings:1.0"
    )
    scan = await wait_final(session_factory, scan_id)
    assert scan.status == ScanStatus.COMPLETED, scan.message

    async with session_factory() as session:
        service = ScanService(session, settings, executor)
        pages = [
            await service.findings(
                user=user,
                scan_id=scan_id,
                kind=FindingKind.VULNERABILITY,
                severity=None,
                page=number,
                page_size=100,
            )
            for number in (1, 32, 33)
        ]
    assert [page.total for page in pages] == [3200, 3200, 3200]
    assert [len(page.items) for page in pages] == [100, 100, 0]
    assert [row.ordinal for row in pages[1].items] == list(range(3100, 3200))
    assert scan.critical + scan.high + scan.medium + scan.low + scan.unknown == 3200


async def test_twenty_concurrent_submissions_complete(
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    settings = make_settings()
    executor = await start_executor(settings)
    users = [await make_user() for _ in range(4)]
    images = [f"{registry}/fixtures/alpine:3.17", f"{registry}/fixtures/secret:1.0"]

    scan_ids = await asyncio.gather(
        *(
            submit(session_factory, settings, executor, users[n % 4], images[n % 2])
            for n in range(20)
        )
    )
    scans = [await wait_final(session_factory, scan_id, within=300) for scan_id in scan_ids]

    assert len(set(scan_ids)) == 20
    assert [scan.status for scan in scans] == ["completed"] * 20, [s.message for s in scans]
    assert {scan.high for scan in scans if scan.image.endswith("alpine:3.17")} == {6}
    assert {scan.secrets for scan in scans if scan.image.endswith("secret:1.0")} == {2}


async def test_no_more_than_max_processes(
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    with silent_server() as address:
        settings = make_settings(scanner={"max_concurrent_scans": 2, "timeout_seconds": 10})
        executor = await start_executor(settings)
        user = await make_user()
        scan_ids = [
            await submit(session_factory, settings, executor, user, f"{address}/hangs:{n}")
            for n in range(4)
        ]
        await asyncio.sleep(3)

        async with session_factory() as session:
            statuses = [
                scan.status
                for scan in [await session.get(Scan, scan_id) for scan_id in scan_ids]
                if scan is not None
            ]
        assert sorted(statuses) == ["pending", "pending", "running", "running"]
        assert len(executor._processes) == 2


async def test_timeout_kills_trivy(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    # Trivy v0.74.0 ignores its own --timeout against a registry that never responds.
    with silent_server() as address:
        settings = make_settings()
        executor = await start_executor(settings)
        user = await make_user()

        started = time.monotonic()
        scan_id = await submit(
            session_factory, settings, executor, user, f"{address}/hangs:1", timeout_seconds=10
        )
        await wait_status(session_factory, scan_id, "running")
        await until(lambda: bool(executor._processes))
        (process,) = executor._processes.values()
        scan = await wait_final(session_factory, scan_id, within=60)

    assert (scan.status, scan.reason) == ("failed", "Timeout")
    assert scan.message is not None and "10 seconds" in scan.message
    assert time.monotonic() - started < 40
    assert not _pid_exists(process.pid)


async def until(condition: Callable[[], bool], *, within: float = 10) -> None:
    """Wait until ``condition()`` holds; fail the test after ``within`` seconds."""
    for _ in range(int(within * 10)):
        if condition():
            return
        await asyncio.sleep(0.1)
    assert condition(), f"condition still false after {within} s"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie that is not reaped yet still exists for kill(0), so it counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_delete_cancels_running_scan(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    with silent_server() as address:
        settings = make_settings()
        executor = await start_executor(settings)
        user = await make_user()
        scan_id = await submit(session_factory, settings, executor, user, f"{address}/hangs:1")
        await wait_status(session_factory, scan_id, "running")
        await until(lambda: scan_id in executor._processes)
        pid = executor._processes[scan_id].pid

        async with session_factory() as session:
            await ScanService(session, settings, executor).delete(user=user, scan_id=scan_id)

        await until(lambda: not _pid_exists(pid))
        await asyncio.sleep(1)
        async with session_factory() as session:
            assert await session.get(Scan, scan_id) is None
        assert scan_id not in executor._processes


def _process_environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in entries if entry)


@pytest.mark.parametrize(
    ("scanner", "expected_gogc", "expected_limit"),
    [
        ({}, "400", str(local_memory_limit(2))),
        ({"go_gc_percent": 150, "go_memory_limit_bytes": 256 * 1024**2}, "150", "268435456"),
        ({"go_gc_percent": None}, None, str(local_memory_limit(2))),
    ],
)
async def test_trivy_runs_with_go_settings(
    scanner: dict[str, object],
    expected_gogc: str | None,
    expected_limit: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    with silent_server() as address:
        settings = make_settings(scanner={"max_concurrent_scans": 2, **scanner})
        executor = await start_executor(settings)
        user = await make_user()
        scan_id = await submit(session_factory, settings, executor, user, f"{address}/hangs:1")
        await until(lambda: scan_id in executor._processes)
        environment = _process_environment(executor._processes[scan_id].pid)

    assert environment.get("GOGC") == expected_gogc
    assert environment["GOMEMLIMIT"] == expected_limit


async def test_idle_worker_scan_committed_running(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    """A submit that finds a worker idle commits its row already running and owned by it."""
    with silent_server() as address:
        settings = make_settings(scanner={"max_concurrent_scans": 1, "timeout_seconds": 60})
        executor = await start_executor(settings)
        user = await make_user()
        await until(lambda: bool(executor._idle))
        async with session_factory() as session:
            accepted = await ScanService(session, settings, executor).submit(
                user=user, image=f"{address}/hangs:1", options=ScanOptions()
            )
        assert accepted.status == ScanStatus.RUNNING

        async with session_factory() as session:
            row = await session.get(Scan, accepted.id)
        assert row is not None
        assert row.status == ScanStatus.RUNNING
        assert row.worker_id == executor.worker_id
        assert row.attempts == 1
        assert row.started_at is not None
        assert row.started_at >= row.created_at
        await until(lambda: accepted.id in executor._processes, within=5)


async def test_early_start_logged_after_submit(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    """A scan started before its commit is logged as started after it is logged as submitted."""
    with silent_server() as address:
        settings = make_settings(scanner={"max_concurrent_scans": 1, "timeout_seconds": 60})
        executor = await start_executor(settings)
        user = await make_user()
        await until(lambda: bool(executor._idle))
        with structlog.testing.capture_logs() as events:
            async with session_factory() as session:
                accepted = await ScanService(session, settings, executor).submit(
                    user=user, image=f"{address}/hangs:1", options=ScanOptions()
                )
            await until(lambda: any(event["event"] == "scan started" for event in events))

    assert accepted.status == ScanStatus.RUNNING
    messages = [event["event"] for event in events if event.get("scan_id") == accepted.id]
    assert messages.index("scan submitted") < messages.index("scan started")
    [started] = [event for event in events if event["event"] == "scan started"]
    assert started["attempt"] == 1


async def test_queued_scans_fill_every_slot(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    """Workers that end handed-off scans one after the other both claim from the queue.

    The poll is 60 s away, so a worker that skipped its claim would leave its slot idle.
    """
    with silent_server() as address:
        settings = make_settings(scanner={"max_concurrent_scans": 2, "timeout_seconds": 60})
        executor = LocalExecutor(
            settings, session_factory, poll_seconds=60, housekeeping_seconds=60
        )
        await executor.start()
        try:
            user = await make_user()
            await until(lambda: len(executor._idle) == 2)
            first = [
                await submit(session_factory, settings, executor, user, f"{address}/first:{n}")
                for n in range(2)
            ]
            await until(lambda: all(scan_id in executor._processes for scan_id in first))
            queued = [
                await submit(session_factory, settings, executor, user, f"{address}/queued:{n}")
                for n in range(2)
            ]

            async def delete(scan_id: str) -> None:
                async with session_factory() as session:
                    await ScanService(session, settings, executor).delete(
                        user=user, scan_id=scan_id
                    )

            await delete(first[0])
            await until(lambda: sum(scan_id in executor._processes for scan_id in queued) == 1)
            await delete(first[1])
            await until(
                lambda: all(scan_id in executor._processes for scan_id in queued), within=10
            )
        finally:
            await executor.stop()


async def test_handed_off_scan_claimed_elsewhere_is_dropped(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    """A submit hands its scan to an idle worker, which starts Trivy before its claim commits.

    Here another worker has claimed the row first, so the claim fails: Trivy, which would hang
    on the silent registry for the whole timeout, is killed and the row is left as it was.
    """
    with silent_server() as address:
        settings = make_settings(scanner={"max_concurrent_scans": 1, "timeout_seconds": 60})
        executor = await start_executor(settings)
        user = await make_user()
        await until(lambda: bool(executor._idle))
        scan = await add_running_scan(
            session_factory, user, f"{address}/hangs:1", worker_id="elsewhere:1:token"
        )

        # The claim waits until Trivy runs, so the test can record the process it then kills.
        pids: list[int] = []
        claim_handed = executor._claim_handed

        async def claim_once_trivy_runs(scan_id: str) -> bool:
            await until(lambda: scan_id in executor._processes, within=5)
            pids.append(executor._processes[scan_id].pid)
            return await claim_handed(scan_id)

        executor._claim_handed = claim_once_trivy_runs  # type: ignore[method-assign]
        await executor.submit(scan)

        await until(lambda: len(pids) == 1, within=5)
        await until(lambda: not _pid_exists(pids[0]), within=5)
        await until(lambda: scan.id not in executor._processes, within=5)
        async with session_factory() as session:
            row = await session.get(Scan, scan.id)
        assert row is not None
        assert (row.status, row.worker_id, row.reason) == ("running", "elsewhere:1:token", None)
        assert row.attempts == 1


async def test_early_start_killed_on_failed_commit(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    start_executor: ExecutorFactory,
) -> None:
    """An idle worker starts Trivy before the submit commits the scan's row.

    Here the commit fails (the user does not exist), so that Trivy, which would hang on the
    silent registry for the whole timeout, is killed, and no row is left behind.
    """
    with silent_server() as address:
        settings = make_settings(scanner={"max_concurrent_scans": 1, "timeout_seconds": 60})
        executor = await start_executor(settings)
        await until(lambda: bool(executor._idle))
        image = f"{address}/hangs:{uuid.uuid4().hex[:8]}"

        pids: list[int] = []
        claim_after_commit = executor._claim_after_commit

        async def record_trivy(hand_off: Any) -> bool:
            scan_id = hand_off.scan.id
            await until(lambda: scan_id in executor._processes, within=5)
            pids.append(executor._processes[scan_id].pid)
            return await claim_after_commit(hand_off)

        executor._claim_after_commit = record_trivy  # type: ignore[method-assign]
        nobody = User(id=str(uuid.uuid4()), email="nobody@example.com", tier="free")
        with pytest.raises(IntegrityError):
            await submit(session_factory, settings, executor, nobody, image)

        await until(lambda: len(pids) == 1, within=5)
        await until(lambda: not _pid_exists(pids[0]), within=5)
        await until(lambda: bool(executor._idle), within=10)
        assert not executor._processes
        async with session_factory() as session:
            rows = await session.scalar(
                select(func.count()).select_from(Scan).where(Scan.image == image)
            )
        assert rows == 0


async def test_dropped_hand_off_keeps_other_runs_entry(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    """Another worker may claim a handed-off scan from the queue and run it first.

    The hand-off's run then loses its claim and is dropped. It must leave the other run's
    process entry alone, or a delete of the scan could no longer kill that run's Trivy.
    """
    with silent_server() as address:
        settings = make_settings(scanner={"max_concurrent_scans": 1, "timeout_seconds": 60})
        executor = await start_executor(settings)
        user = await make_user()
        await until(lambda: bool(executor._idle))
        scan = await add_running_scan(
            session_factory, user, f"{address}/hangs:1", worker_id=executor.worker_id
        )
        # Stands in for the process of the run that claimed the scan from the queue.
        other_run = object()
        executor._processes[scan.id] = other_run  # type: ignore[assignment]
        claims: list[bool] = []
        claim_handed = executor._claim_handed

        async def record_claim(scan_id: str) -> bool:
            owned = await claim_handed(scan_id)
            claims.append(owned)
            return owned

        executor._claim_handed = record_claim  # type: ignore[method-assign]
        await executor.submit(scan)

        await until(lambda: claims == [False], within=5)
        # The dropped run's worker is idle again once its Trivy is gone and it has cleaned up.
        await until(lambda: bool(executor._idle), within=10)
        assert executor._processes.get(scan.id) is other_run
        del executor._processes[scan.id]


async def test_submit_and_its_audit_event_commit_together(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    database: Any,
) -> None:
    """An audit event that cannot be written takes the scan's creation down with it."""
    if database.backend != "postgresql":
        pytest.skip("SQLite does not enforce column lengths, so the event cannot be made to fail")
    settings = make_settings()
    executor = LocalExecutor(settings, session_factory)
    user = await make_user()
    # The audit table's actor column is 320 characters long, and PostgreSQL rejects more.
    actor = Actor(user_id=user.id, name="a" * 400, source_ip=None)

    async with session_factory() as session:
        with pytest.raises(DBAPIError):
            await ScanService(session, settings, executor).submit(
                user=user, image="127.0.0.1:5000/app:1", options=ScanOptions(), actor=actor
            )

    async with session_factory() as session:
        assert await repository.count_active_scans(session, user_id=user.id) == 0


async def test_missing_db_fails_fast(
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
    tmp_path: Path,
) -> None:
    # Trivy tries to download the DB from a loopback port where no server listens.
    settings = make_settings(
        scanner={
            "offline": False,
            "cache_dir": str(tmp_path / "empty-cache"),
            "db_repository": f"127.0.0.1:{unused_port()}/mirror/trivy-db:2",
        }
    )
    executor = await start_executor(settings)
    user = await make_user()

    started = time.monotonic()
    first = await submit(
        session_factory, settings, executor, user, f"{registry}/fixtures/alpine:3.17"
    )
    first_scan = await wait_final(session_factory, first, within=60)
    second = await submit(
        session_factory, settings, executor, user, f"{registry}/fixtures/alpine:3.17"
    )
    second_scan = await wait_final(session_factory, second, within=60)

    assert time.monotonic() - started < 20
    for scan in (first_scan, second_scan):
        assert (scan.status, scan.reason) == ("failed", "DatabaseUnavailable")
        assert scan.message is not None
        assert "failed to download vulnerability DB" in scan.message
        assert "connection refused" in scan.message
        assert "submit the scan again later" in scan.message
        assert "SECAPI_SCANNER__OFFLINE=true" in scan.message


async def test_offline_without_db_fails(
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
    tmp_path: Path,
) -> None:
    settings = make_settings(scanner={"offline": True, "cache_dir": str(tmp_path / "empty")})
    executor = await start_executor(settings)
    user = await make_user()

    scan_id = await submit(
        session_factory, settings, executor, user, f"{registry}/fixtures/alpine:3.17"
    )
    scan = await wait_final(session_factory, scan_id, within=60)

    assert (scan.status, scan.reason) == ("failed", "DatabaseUnavailable")
    assert scan.message is not None and "--skip-db-update" in scan.message


async def test_managed_db_is_used_when_fresh(
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    # Online mode with the fixture DB: its NextUpdate lies far ahead, so nothing is downloaded.
    settings = make_settings(
        scanner={"offline": False, "db_repository": f"127.0.0.1:{unused_port()}/never/used:2"}
    )
    executor = await start_executor(settings)
    user = await make_user()

    scan_id = await submit(
        session_factory, settings, executor, user, f"{registry}/fixtures/alpine:3.17"
    )
    scan = await wait_final(session_factory, scan_id)

    assert scan.status == ScanStatus.COMPLETED, scan.message
    assert scan.high == 6


async def test_relative_scanner_paths_work(
    registry: str,
    trivy_bin: str,
    trivy_cache: Path,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Trivy runs in a scratch folder, so relative settings must be resolved before it starts.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").symlink_to(trivy_cache)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "trivy").symlink_to(trivy_bin)  # an absolute path in the bed
    settings = make_settings(scanner={"cache_dir": "cache", "trivy_bin": "bin/trivy"})
    executor = await start_executor(settings)
    user = await make_user()

    scan_id = await submit(
        session_factory, settings, executor, user, f"{registry}/fixtures/alpine:3.17"
    )
    scan = await wait_final(session_factory, scan_id)

    assert scan.status == ScanStatus.COMPLETED, scan.message
    assert scan.high == 6


async def test_registry_credentials_from_environment(
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with auth_registry(tmp_path / "registry") as private:
        image = f"{private.address}/private/alpine:3.17"
        copy_image(
            f"{registry}/fixtures/alpine:3.17",
            image,
            dest_creds=f"{private.username}:{private.password}",
        )
        settings = make_settings()
        user = await make_user()

        monkeypatch.setenv("TRIVY_USERNAME", private.username)
        monkeypatch.setenv("TRIVY_PASSWORD", "Wr0ng-Passw0rd-77")
        wrong = await start_executor(settings)
        denied = await wait_final(
            session_factory, await submit(session_factory, settings, wrong, user, image), within=60
        )
        await wrong.stop()

        monkeypatch.setenv("TRIVY_PASSWORD", private.password)
        right = await start_executor(settings)
        allowed = await wait_final(
            session_factory, await submit(session_factory, settings, right, user, image)
        )

    assert (denied.status, denied.reason) == ("failed", "RegistryAuthFailed")
    assert denied.message is not None and "Wr0ng-Passw0rd-77" not in denied.message
    assert allowed.status == ScanStatus.COMPLETED, allowed.message
    assert allowed.high == 6


async def test_secapi_secrets_do_not_reach_trivy(monkeypatch: pytest.MonkeyPatch) -> None:
    from secapi.core.scans.process import trivy_environment

    environment = trivy_environment(
        {
            "SECRET_KEY": "k",
            "DATABASE_URL": "postgresql://u:p@h/d",
            "REDIS_URL": "redis://h",
            "SECAPI_SECRET_KEY": "k",
            "TRIVY_PASSWORD": "p",
            "TRIVY_INSECURE": "true",
            "AWS_REGION": "eu-west-1",
            "PATH": "/usr/bin",
            "HTTPS_PROXY": "http://127.0.0.1:3128",
        }
    )

    assert environment == {
        "TRIVY_PASSWORD": "p",
        "TRIVY_INSECURE": "true",
        "AWS_REGION": "eu-west-1",
        "PATH": "/usr/bin",
        "HTTPS_PROXY": "http://127.0.0.1:3128",
    }


async def test_orphans_requeued_once_then_interrupted(
    registry: str,
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    settings = make_settings()
    user = await make_user()
    dead_worker = f"{socket.gethostname()[:40]}:{_dead_pid()}:deadbeef"
    async with session_factory() as session:
        ids = []
        for attempts in (1, 2):
            scan = await repository.add_scan(
                session,
                user_id=user.id,
                image=f"{registry}/fixtures/alpine:3.17",
                options=ScanOptions().model_dump(mode="json"),
                priority=0,
                executor="local",
            )
            scan.status = ScanStatus.RUNNING.value
            scan.worker_id = dead_worker
            scan.started_at = utcnow()
            scan.attempts = attempts
            ids.append(scan.id)
        await session.commit()

    await start_executor(settings)
    requeued = await wait_final(session_factory, ids[0])
    interrupted = await wait_final(session_factory, ids[1])

    assert requeued.status == ScanStatus.COMPLETED, requeued.message
    assert requeued.attempts == 2
    assert (interrupted.status, interrupted.reason) == ("failed", "Interrupted")


def _dead_pid() -> int:
    """Return a pid that no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


async def test_queue_timeout(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    with silent_server() as address:
        settings = make_settings(
            scanner={"max_concurrent_scans": 1, "timeout_seconds": 60, "queue_timeout_seconds": 10}
        )
        executor = await start_executor(settings)
        user = await make_user()
        # The only worker is busy with a scan that hangs, so the next one waits.
        busy = await submit(session_factory, settings, executor, user, f"{address}/hangs:1")
        await wait_status(session_factory, busy, "running")
        waiting = await submit(session_factory, settings, executor, user, f"{address}/hangs:2")

        scan = await wait_final(session_factory, waiting, within=40)

    assert (scan.status, scan.reason) == ("failed", "QueueTimeout")
    assert scan.started_at is None
    assert scan.message is not None and "10 seconds" in scan.message


async def test_stop_returns_running_scans_to_queue(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    with silent_server() as address:
        settings = make_settings()
        executor = await start_executor(settings)
        user = await make_user()
        scan_id = await submit(session_factory, settings, executor, user, f"{address}/hangs:1")
        await wait_status(session_factory, scan_id, "running")

        await executor.stop()

    async with session_factory() as session:
        scan = await session.get(Scan, scan_id)
    assert scan is not None
    assert (scan.status, scan.worker_id, scan.attempts) == ("pending", None, 0)


async def test_missing_trivy_rejects_submit(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
    tmp_path: Path,
) -> None:
    settings = make_settings(scanner={"trivy_bin": str(tmp_path / "no-trivy-here")})
    executor = await start_executor(settings)
    user = await make_user()

    with pytest.raises(ServiceUnavailableError) as raised:
        await executor.check_ready()
    assert "SECAPI_SCANNER__TRIVY_BIN" in raised.value.message

    async with session_factory() as session:
        with pytest.raises(ServiceUnavailableError):
            await ScanService(session, settings, executor).submit(
                user=user, image="alpine:3.20", options=ScanOptions()
            )
        (scan,), _ = await repository.list_user_scans(
            session, user_id=user.id, statuses=None, offset=0, limit=10
        )
    assert (scan.status, scan.reason) == ("failed", "ExecutorUnavailable")


async def test_concurrent_scan_quota(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    with silent_server() as address:
        settings = make_settings(tiers=tiers(concurrent_scans=1))
        executor = await start_executor(settings)
        user = await make_user()
        first = await submit(session_factory, settings, executor, user, f"{address}/hangs:1")

        with pytest.raises(QuotaExceededError) as raised:
            await submit(session_factory, settings, executor, user, f"{address}/hangs:2")
        async with session_factory() as session:
            await ScanService(session, settings, executor).delete(user=user, scan_id=first)

    assert raised.value.limit == 1
    assert raised.value.retry_after > 0


async def test_simultaneous_submits_respect_quota(
    make_settings: Callable[..., Settings],
    session_factory: SessionFactory,
    make_user: UserFactory,
    start_executor: ExecutorFactory,
) -> None:
    """Submissions sent at once are counted one after the other: three of six pass a limit of 3."""
    with silent_server() as address:
        settings = make_settings(
            tiers=tiers(concurrent_scans=3), scanner={"max_concurrent_scans": 10}
        )
        executor = await start_executor(settings)
        user = await make_user()
        outcomes = await asyncio.gather(
            *(
                submit(session_factory, settings, executor, user, f"{address}/hangs:{n}")
                for n in range(6)
            ),
            return_exceptions=True,
        )
        accepted = [outcome for outcome in outcomes if isinstance(outcome, str)]
        rejected = [outcome for outcome in outcomes if isinstance(outcome, QuotaExceededError)]
        async with session_factory() as session:
            for scan_id in accepted:
                await ScanService(session, settings, executor).delete(user=user, scan_id=scan_id)

    assert len(accepted) == 3, outcomes
    assert len(rejected) == 3, outcomes


async def test_create_executor_picks_local(
    make_settings: Callable[..., Settings], session_factory: SessionFactory
) -> None:
    executor = create_executor(make_settings(), session_factory)

    assert isinstance(executor, LocalExecutor)
    assert executor.name == "local"
