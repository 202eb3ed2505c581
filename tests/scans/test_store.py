"""The results store: findings, document and summary in one transaction, stored once."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from secapi.core.db.engine import create_engine, create_session_factory, sync_sqlite_engine
from secapi.core.db.migrate import upgrade_to_head
from secapi.core.db.models import Finding, FindingKind, Scan, ScanReport, ScanStatus, User
from secapi.core.scans import repository
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.report import ParsedReport, parse_report
from secapi.core.scans.store import read_results_document, store_results, store_results_sync
from secapi.core.settings import Settings, Tier
from tests.scans.conftest import Database, ReportFactory, UserFactory

SessionFactory = async_sessionmaker[AsyncSession]


@pytest.fixture(scope="module")
def alpine_report(registry: str, trivy_report: ReportFactory) -> ParsedReport:
    return parse_report(trivy_report(f"{registry}/fixtures/alpine:3.17"))


@pytest.fixture(scope="module")
def secret_report(registry: str, trivy_report: ReportFactory) -> ParsedReport:
    return parse_report(trivy_report(f"{registry}/fixtures/secret:1.0"))


@pytest.fixture(scope="module")
def license_report(registry: str, trivy_report: ReportFactory) -> ParsedReport:
    options = ScanOptions(scanners=["vuln", "license"])
    return parse_report(trivy_report(f"{registry}/fixtures/app:1.0", options=options))


@pytest.fixture(scope="module")
def many_report_path(registry: str, trivy_report: ReportFactory) -> Path:
    return trivy_report(f"{registry}/fixtures/many-findings:1.0")


async def running_scan(session_factory: SessionFactory, make_user: UserFactory) -> str:
    user = await make_user()
    async with session_factory() as session:
        scan = await repository.add_scan(
            session, user_id=user.id, image="img:1", options={}, priority=0, executor="local"
        )
        assert await repository.mark_running(
            session, scan_id=scan.id, worker_id="w", started_at=scan.created_at
        )
        await session.commit()
        return scan.id


async def count_findings(session_factory: SessionFactory, scan_id: str) -> int:
    async with session_factory() as session:
        total = await session.scalar(
            select(func.count()).select_from(Finding).where(Finding.scan_id == scan_id)
        )
        return int(total or 0)


async def store(session_factory: SessionFactory, scan_id: str, report: ParsedReport) -> bool:
    async with session_factory() as session:
        scan = await session.get(Scan, scan_id)
        assert scan is not None
        stored = await store_results(session, scan=scan, report=report, trivy_version="0.74.0")
        await session.commit()
        return stored


async def test_store_writes_everything(
    session_factory: SessionFactory, make_user: UserFactory, alpine_report: ParsedReport
) -> None:
    scan_id = await running_scan(session_factory, make_user)

    assert await store(session_factory, scan_id, alpine_report)

    async with session_factory() as session:
        scan = await session.get(Scan, scan_id)
        assert scan is not None
        assert scan.status == ScanStatus.COMPLETED
        assert scan.completed_at is not None
        assert (scan.critical, scan.high, scan.medium, scan.low, scan.unknown) == (0, 6, 6, 0, 0)
        assert scan.secrets == 0
        assert scan.os_family == "alpine"
        assert scan.os_name == "3.17.0"
        assert scan.os_eosl is True
        assert scan.image_digest == alpine_report.image_digest
        assert scan.trivy_version == "0.74.0"

        report_row = await session.get(ScanReport, scan_id)
        assert report_row is not None
        assert report_row.report_sha256 == alpine_report.sha256
        assert report_row.report_bytes == alpine_report.size
    assert await count_findings(session_factory, scan_id) == 12


async def test_results_document_shape(
    session_factory: SessionFactory, make_user: UserFactory, alpine_report: ParsedReport
) -> None:
    scan_id = await running_scan(session_factory, make_user)
    await store(session_factory, scan_id, alpine_report)

    async with session_factory() as session:
        document = await read_results_document(session, scan_id=scan_id)
        compressed = await session.scalar(
            select(ScanReport.results_gzip).where(ScanReport.scan_id == scan_id)
        )
    assert document is not None and compressed is not None
    assert gzip.decompress(compressed) == document
    results = json.loads(document)

    assert list(results) == [
        "summary",
        "image_digest",
        "os",
        "trivy_version",
        "db_updated_at",
        "vulnerabilities",
        "secrets",
        "misconfigurations",
        "licenses",
    ]
    assert results["summary"] == {
        "critical": 0,
        "high": 6,
        "medium": 6,
        "low": 0,
        "unknown": 0,
        "total": 12,
        "secrets": 0,
        "misconfigurations": 0,
        "licenses": 0,
    }
    assert results["licenses"] == []
    assert results["os"] == {"family": "alpine", "name": "3.17.0", "eosl": True}
    assert results["trivy_version"] == "0.74.0"
    assert len(results["vulnerabilities"]) == 12
    assert set(results["vulnerabilities"][0]) == {
        "id",
        "package",
        "installed_version",
        "fixed_version",
        "severity",
        "title",
        "target",
        "package_type",
        "package_path",
        "primary_url",
    }
    # OS packages have no package path.
    assert {v["package_path"] for v in results["vulnerabilities"]} == {None}
    expected = {(v.id, v.package, v.installed_version) for v in alpine_report.vulnerabilities}
    stored = {(v["id"], v["package"], v["installed_version"]) for v in results["vulnerabilities"]}
    assert stored == expected


async def test_secret_rows_and_document(
    session_factory: SessionFactory, make_user: UserFactory, secret_report: ParsedReport
) -> None:
    scan_id = await running_scan(session_factory, make_user)
    await store(session_factory, scan_id, secret_report)

    async with session_factory() as session:
        rows, total = await repository.findings_page(
            session, scan_id=scan_id, kind=FindingKind.SECRET, severity=None, offset=0, limit=10
        )
        document = await read_results_document(session, scan_id=scan_id)
    assert total == 2
    github = next(row for row in rows if row.identifier == "github-pat")
    assert github.details == {"category": "GitHub", "start_line": 3, "end_line": 3}
    assert github.target == "/srv/app/deploy.env"
    assert document is not None
    secrets = json.loads(document)["secrets"]
    assert {s["rule_id"] for s in secrets} == {"github-pat", "aws-access-key-id"}
    assert set(secrets[0]) == {
        "rule_id",
        "category",
        "severity",
        "title",
        "target",
        "start_line",
        "end_line",
    }


async def test_license_rows_and_document(
    session_factory: SessionFactory, make_user: UserFactory, license_report: ParsedReport
) -> None:
    scan_id = await running_scan(session_factory, make_user)
    await store(session_factory, scan_id, license_report)

    async with session_factory() as session:
        rows, total = await repository.findings_page(
            session, scan_id=scan_id, kind=FindingKind.LICENSE, severity=None, offset=0, limit=20
        )
        scan = await session.get(Scan, scan_id)
        document = await read_results_document(session, scan_id=scan_id)
    assert total == 9
    assert scan is not None
    assert scan.licenses == 9
    # Licenses are not vulnerabilities: the severity counts stay those of the 15 vulnerabilities.
    assert scan.critical + scan.high + scan.medium + scan.low + scan.unknown == 15
    requests = next(row for row in rows if row.package_name == "requests")
    assert (requests.identifier, requests.title) == ("Apache-2.0", "Apache-2.0")
    assert requests.severity == "LOW"
    assert requests.target == "Python"
    assert requests.target_class == "license"
    assert requests.primary_url is None
    assert requests.details == {
        "category": "notice",
        "package_path": "usr/local/lib/python3.11/site-packages/requests-2.28.2.dist-info/METADATA",
        "confidence": 1.0,
    }
    assert [row.ordinal for row in rows] == list(range(9))

    assert document is not None
    results = json.loads(document)
    assert results["summary"]["licenses"] == 9
    assert results["summary"]["total"] == 15
    licenses = results["licenses"]
    assert [item["package"] for item in licenses] == [x.package for x in license_report.licenses]
    assert licenses[0] == {
        "name": "MIT",
        "package": "axios",
        "severity": "LOW",
        "category": "notice",
        "target": "Node.js",
        "package_path": "srv/app/node_modules/axios/package.json",
        "confidence": 1.0,
        "link": None,
    }


async def test_second_store_changes_nothing(
    session_factory: SessionFactory, make_user: UserFactory, alpine_report: ParsedReport
) -> None:
    scan_id = await running_scan(session_factory, make_user)
    assert await store(session_factory, scan_id, alpine_report)
    async with session_factory() as session:
        first = await session.get(Scan, scan_id)
        assert first is not None
        completed_at = first.completed_at

    assert not await store(session_factory, scan_id, alpine_report)

    assert await count_findings(session_factory, scan_id) == 12
    async with session_factory() as session:
        again = await session.get(Scan, scan_id)
        assert again is not None
        assert again.completed_at == completed_at
        reports = await session.scalar(
            select(func.count()).select_from(ScanReport).where(ScanReport.scan_id == scan_id)
        )
        assert reports == 1


async def test_failed_scan_is_not_completed(
    session_factory: SessionFactory, make_user: UserFactory, alpine_report: ParsedReport
) -> None:
    scan_id = await running_scan(session_factory, make_user)
    async with session_factory() as session:
        assert await repository.mark_failed(
            session, scan_id=scan_id, reason="Timeout", message="too slow"
        )
        await session.commit()

    assert not await store(session_factory, scan_id, alpine_report)

    assert await count_findings(session_factory, scan_id) == 0
    async with session_factory() as session:
        scan = await session.get(Scan, scan_id)
        assert scan is not None
        assert scan.status == ScanStatus.FAILED
        assert scan.reason == "Timeout"


async def test_rollback_leaves_nothing(
    session_factory: SessionFactory, make_user: UserFactory, alpine_report: ParsedReport
) -> None:
    scan_id = await running_scan(session_factory, make_user)

    async with session_factory() as session:
        scan = await session.get(Scan, scan_id)
        assert scan is not None
        assert await store_results(session, scan=scan, report=alpine_report)
        # Everything was written in this transaction; abandon it.
        await session.rollback()

    assert await count_findings(session_factory, scan_id) == 0
    async with session_factory() as session:
        scan = await session.get(Scan, scan_id)
        assert scan is not None
        assert scan.status == ScanStatus.RUNNING
        assert scan.critical == scan.high == 0
        assert await session.get(ScanReport, scan_id) is None
    # Nothing half-stored blocks a later attempt.
    assert await store(session_factory, scan_id, alpine_report)
    assert await count_findings(session_factory, scan_id) == 12


async def test_concurrent_stores_write_once(
    database: Database,
    session_factory: SessionFactory,
    make_user: UserFactory,
    alpine_report: ParsedReport,
) -> None:
    if database.backend != "postgresql":
        pytest.skip("SQLite has no row locks; one local executor process stores each scan")
    scan_id = await running_scan(session_factory, make_user)

    results = await asyncio.gather(
        *(store(session_factory, scan_id, alpine_report) for _ in range(4))
    )

    assert sorted(results) == [False, False, False, True]
    assert await count_findings(session_factory, scan_id) == 12


async def finding_rows(session_factory: SessionFactory, scan_id: str) -> list[tuple[object, ...]]:
    """Return a scan's findings rows without their ids, in report order within each kind."""
    async with session_factory() as session:
        findings = await session.scalars(
            select(Finding)
            .where(Finding.scan_id == scan_id)
            .order_by(Finding.kind, Finding.ordinal)
        )
        return [
            (
                finding.kind,
                finding.ordinal,
                finding.severity,
                finding.identifier,
                finding.target,
                finding.target_class,
                finding.package_type,
                finding.package_name,
                finding.installed_version,
                finding.fixed_version,
                finding.title,
                finding.primary_url,
                finding.details,
            )
            for finding in findings
        ]


async def test_copy_matches_sqlite_insert(
    database: Database,
    session_factory: SessionFactory,
    make_user: UserFactory,
    many_report_path: Path,
    secret_report: ParsedReport,
    license_report: ParsedReport,
    tmp_path: Path,
) -> None:
    if database.backend != "postgresql":
        pytest.skip("compares PostgreSQL's COPY with SQLite's INSERT; runs once, on PostgreSQL")
    sqlite_url = f"sqlite:///{tmp_path / 'secapi.db'}"
    upgrade_to_head(Settings(database_url=sqlite_url, data_dir=tmp_path))
    sqlite_engine = create_engine(Settings(database_url=sqlite_url))
    sqlite_factory = create_session_factory(sqlite_engine)

    async def sqlite_user(tier: Tier = Tier.FREE) -> User:
        async with sqlite_factory() as session:
            user = User(email=f"copy-{uuid.uuid4().hex[:10]}@example.com", tier=tier.value)
            session.add(user)
            await session.commit()
            return user

    try:
        for report in (parse_report(many_report_path), secret_report, license_report):
            postgres_scan = await running_scan(session_factory, make_user)
            sqlite_scan = await running_scan(sqlite_factory, sqlite_user)
            assert await store(session_factory, postgres_scan, report)
            assert await store(sqlite_factory, sqlite_scan, report)

            postgres_rows = await finding_rows(session_factory, postgres_scan)
            sqlite_rows = await finding_rows(sqlite_factory, sqlite_scan)
            kinds = (report.vulnerabilities, report.secrets, report.misconfigurations)
            assert len(postgres_rows) == sum(map(len, kinds)) + len(report.licenses)
            assert postgres_rows
            assert postgres_rows == sqlite_rows
    finally:
        await sqlite_engine.dispose()


def store_sync(
    session_factory: SessionFactory, scan_id: str, report: ParsedReport, *, worker_id: str = "w"
) -> bool:
    """Store a report the local executor's way on SQLite: a synchronous engine, one transaction."""
    engine = sync_sqlite_engine(session_factory)
    assert engine is not None
    try:
        with engine.connect() as connection:
            stored = store_results_sync(
                connection,
                scan_id=scan_id,
                worker_id=worker_id,
                report=report,
                trivy_version="0.74.0",
            )
            connection.commit()
            return stored
    finally:
        engine.dispose()


async def stored_scan(
    session_factory: SessionFactory, scan_id: str
) -> tuple[tuple[object, ...], bytes | None]:
    """Return a scan's stored summary columns and its uncompressed results document."""
    async with session_factory() as session:
        scan = await session.get(Scan, scan_id)
        assert scan is not None
        columns = (
            scan.status,
            scan.image_digest,
            scan.os_family,
            scan.os_name,
            scan.os_eosl,
            scan.trivy_version,
            scan.critical,
            scan.high,
            scan.medium,
            scan.low,
            scan.unknown,
            scan.secrets,
            scan.misconfigurations,
            scan.licenses,
            scan.completed_at is not None,
        )
        return columns, await read_results_document(session, scan_id=scan_id)


async def test_sync_store_matches_async_store(
    database: Database,
    session_factory: SessionFactory,
    make_user: UserFactory,
    many_report_path: Path,
    alpine_report: ParsedReport,
    secret_report: ParsedReport,
    license_report: ParsedReport,
) -> None:
    """The local executor's one-thread store on SQLite writes what store_results writes."""
    if database.backend != "sqlite":
        pytest.skip("the synchronous store is used on SQLite only")
    # The 3,200-finding report has its document built in a thread, the small ones do not.
    reports = (parse_report(many_report_path), alpine_report, secret_report, license_report)
    for report in reports:
        async_scan = await running_scan(session_factory, make_user)
        sync_scan = await running_scan(session_factory, make_user)
        assert await store(session_factory, async_scan, report)
        assert await asyncio.to_thread(store_sync, session_factory, sync_scan, report)

        rows = await finding_rows(session_factory, sync_scan)
        assert rows
        assert rows == await finding_rows(session_factory, async_scan)
        sync_columns, sync_document = await stored_scan(session_factory, sync_scan)
        assert sync_columns[0] == ScanStatus.COMPLETED
        assert (sync_columns, sync_document) == await stored_scan(session_factory, async_scan)
        async with session_factory() as session:
            stored = await session.get(ScanReport, sync_scan)
            assert stored is not None
            assert (stored.report_sha256, stored.report_bytes) == (report.sha256, report.size)


async def test_sync_store_skips_other_workers_scan(
    database: Database,
    session_factory: SessionFactory,
    make_user: UserFactory,
    alpine_report: ParsedReport,
    many_report_path: Path,
) -> None:
    """A worker whose claim was lost (or whose scan failed meanwhile) writes nothing."""
    if database.backend != "sqlite":
        pytest.skip("the synchronous store is used on SQLite only")
    for report, findings in ((alpine_report, 12), (parse_report(many_report_path), 3200)):
        scan_id = await running_scan(session_factory, make_user)
        stored = await asyncio.to_thread(
            store_sync, session_factory, scan_id, report, worker_id="another"
        )
        assert stored is False
        assert await count_findings(session_factory, scan_id) == 0
        columns, document = await stored_scan(session_factory, scan_id)
        assert columns[0] == ScanStatus.RUNNING
        assert document is None

        # The worker that claimed it stores it, once.
        assert await asyncio.to_thread(store_sync, session_factory, scan_id, report)
        assert not await asyncio.to_thread(store_sync, session_factory, scan_id, report)
        assert await count_findings(session_factory, scan_id) == findings


async def test_large_report_pages(
    session_factory: SessionFactory, make_user: UserFactory, many_report_path: Path
) -> None:
    report = parse_report(many_report_path)
    scan_id = await running_scan(session_factory, make_user)
    await store(session_factory, scan_id, report)

    async with session_factory() as session:
        first, total = await repository.findings_page(
            session,
            scan_id=scan_id,
            kind=FindingKind.VULNERABILITY,
            severity=None,
            offset=0,
            limit=100,
        )
        last, _ = await repository.findings_page(
            session,
            scan_id=scan_id,
            kind=FindingKind.VULNERABILITY,
            severity=None,
            offset=3100,
            limit=100,
        )
        critical, critical_total = await repository.findings_page(
            session,
            scan_id=scan_id,
            kind=FindingKind.VULNERABILITY,
            severity="CRITICAL",
            offset=0,
            limit=100,
        )
        scan = await session.get(Scan, scan_id)
    assert total == 3200
    assert [row.ordinal for row in first] == list(range(100))
    assert [row.ordinal for row in last] == list(range(3100, 3200))
    assert (first[0].identifier, first[0].package_name) == (
        report.vulnerabilities[0].id,
        report.vulnerabilities[0].package,
    )
    assert scan is not None
    assert critical_total == scan.critical == report.summary.critical
    assert all(row.severity == "CRITICAL" for row in critical)
    assert first[0].target == "Node.js"
    assert first[0].details == {"package_path": report.vulnerabilities[0].package_path}
    assert last[-1].details == {"package_path": "srv/app-160/node_modules/ws/package.json"}

    async with session_factory() as session:
        document = await read_results_document(session, scan_id=scan_id)
    assert document is not None
    stored_paths = [v["package_path"] for v in json.loads(document)["vulnerabilities"]]
    assert stored_paths == [v.package_path for v in report.vulnerabilities]


async def test_delete_removes_findings_and_report(
    session_factory: SessionFactory, make_user: UserFactory, alpine_report: ParsedReport
) -> None:
    scan_id = await running_scan(session_factory, make_user)
    await store(session_factory, scan_id, alpine_report)

    async with session_factory() as session:
        assert await repository.delete_scan(session, scan_id=scan_id)
        await session.commit()
    async with session_factory() as session:
        assert not await repository.delete_scan(session, scan_id=scan_id)
        assert await session.get(ScanReport, scan_id) is None
    assert await count_findings(session_factory, scan_id) == 0
