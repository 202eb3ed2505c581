"""Store a parsed report: findings rows, the results document and the scan's summary.

``store_results`` writes all three in the caller's transaction, so a scan is
either completed with all of its results or not completed at all. The results
document is built once here, gzip-compressed, and served as stored: reading a
scan never serialises thousands of findings again.

Both executors call it (the local one after a Trivy process, the operator
after it decoded a pod log), so nothing here depends on how the report was made.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import itertools
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from pydantic import TypeAdapter
from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from secapi.core.db.models import Finding, FindingKind, Scan, ScanReport, ScanStatus, utcnow
from secapi.core.scans.report import (
    License,
    Misconfiguration,
    ParsedReport,
    Secret,
    Vulnerability,
)

log = structlog.get_logger(__name__)

# Level 1 compresses a 3,200-finding document in 1.5 ms where level 6 took 12 ms,
# for a few more bytes of storage.
GZIP_LEVEL = 1
# Findings encoded to JSON at once while the results document is written.
DOCUMENT_BATCH_ITEMS = 1000
# From this many findings on, the synchronous store builds the document in a thread while
# it writes the rows. A smaller document takes less time to build than a thread takes to start.
THREADED_DOCUMENT_FINDINGS = 200
_JSON_ENCODER = msgspec.json.Encoder()
_TIMESTAMP = TypeAdapter(datetime)

# Column sizes of the findings and scans tables; longer values are cut to fit.
_IDENTIFIER_LENGTH = 128
_SHORT_LENGTH = 32
_SEVERITY_LENGTH = 10
_DIGEST_LENGTH = 128
_OS_LENGTH = 64
_VERSION_LENGTH = 32


def _cut(value: str | None, length: int) -> str | None:
    return value if value is None or len(value) <= length else value[:length]


def vulnerability_item(finding: Vulnerability) -> dict[str, Any]:
    """Return a vulnerability as it appears in the results document."""
    return {
        "id": finding.id,
        "package": finding.package,
        "installed_version": finding.installed_version,
        "fixed_version": finding.fixed_version,
        "severity": finding.severity,
        "title": finding.title,
        "target": finding.target,
        "package_type": finding.package_type,
        "package_path": finding.package_path,
        "primary_url": finding.primary_url,
    }


def secret_item(finding: Secret) -> dict[str, Any]:
    """Return a secret as it appears in the results document."""
    return {
        "rule_id": finding.rule_id,
        "category": finding.category,
        "severity": finding.severity,
        "title": finding.title,
        "target": finding.target,
        "start_line": finding.start_line,
        "end_line": finding.end_line,
    }


def misconfiguration_item(finding: Misconfiguration) -> dict[str, Any]:
    """Return a misconfiguration as it appears in the results document."""
    return {
        "id": finding.id,
        "title": finding.title,
        "severity": finding.severity,
        "target": finding.target,
        "message": finding.message,
        "resolution": finding.resolution,
        "primary_url": finding.primary_url,
    }


def license_item(finding: License) -> dict[str, Any]:
    """Return a license as it appears in the results document."""
    return {
        "name": finding.name,
        "package": finding.package,
        "severity": finding.severity,
        "category": finding.category,
        "target": finding.target,
        "package_path": finding.package_path,
        "confidence": finding.confidence,
        "link": finding.link,
    }


def _json(value: Any) -> bytes:
    return _JSON_ENCODER.encode(value)


def _write_list(out: gzip.GzipFile, items: Iterable[dict[str, Any]]) -> None:
    """Write a JSON list, encoding ``DOCUMENT_BATCH_ITEMS`` items at a time."""
    out.write(b"[")
    iterator = iter(items)
    separator = b""
    while batch := list(itertools.islice(iterator, DOCUMENT_BATCH_ITEMS)):
        # The batch's own brackets are cut off, so batches join into one list.
        out.write(separator + _JSON_ENCODER.encode(batch)[1:-1])
        separator = b","
    out.write(b"]")


def _timestamp(value: datetime | None) -> str | None:
    """Format a timestamp in UTC as the API's models do ("Z"), so every response matches.

    A naive timestamp is taken as UTC, as the database columns store it.
    NOTE: documents stored before this format was fixed keep "+00:00"; only scans that
    complete afterwards get "Z".
    """
    if value is None:
        return None
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text: str = _TIMESTAMP.dump_python(utc, mode="json")
    return text


def build_results_document(
    report: ParsedReport, *, trivy_version: str | None, db_updated_at: datetime | None
) -> bytes:
    """Return the gzip-compressed JSON results document of a report.

    The JSON is written item by item into the compressor, so the
    uncompressed document never exists in memory as a whole.
    """
    os_info = None
    if report.os_family:
        os_info = {"family": report.os_family, "name": report.os_name, "eosl": report.os_eosl}
    head = {
        "summary": report.summary.as_dict(),
        "image_digest": report.image_digest,
        "os": os_info,
        "trivy_version": trivy_version,
        "db_updated_at": _timestamp(db_updated_at),
    }

    buffer = io.BytesIO()
    # mtime=0 makes equal documents compress to equal bytes.
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as out:
        out.write(_json(head)[:-1])
        out.write(b',"vulnerabilities":')
        _write_list(out, map(vulnerability_item, report.vulnerabilities))
        out.write(b',"secrets":')
        _write_list(out, map(secret_item, report.secrets))
        out.write(b',"misconfigurations":')
        _write_list(out, map(misconfiguration_item, report.misconfigurations))
        out.write(b',"licenses":')
        _write_list(out, map(license_item, report.licenses))
        out.write(b"}")
    return buffer.getvalue()


def _details(value: dict[str, Any]) -> str:
    return _JSON_ENCODER.encode(value).decode()


def _finding_rows(scan_id: str, report: ParsedReport) -> Iterator[tuple[Any, ...]]:
    """Yield one row per finding in ``_COLUMNS`` order, numbered in report order within each kind.

    ``details`` is JSON text, as SQLAlchemy would write it for the JSON column.
    """
    kind = FindingKind.VULNERABILITY.value
    for ordinal, vulnerability in enumerate(report.vulnerabilities):
        yield (
            scan_id,
            kind,
            ordinal,
            vulnerability.severity,
            _cut(vulnerability.id, _IDENTIFIER_LENGTH),
            vulnerability.target,
            _cut(vulnerability.target_class, _SHORT_LENGTH),
            _cut(vulnerability.package_type, _SHORT_LENGTH),
            vulnerability.package,
            vulnerability.installed_version,
            vulnerability.fixed_version,
            vulnerability.title,
            vulnerability.primary_url,
            _details({"package_path": vulnerability.package_path}),
        )
    kind = FindingKind.SECRET.value
    for ordinal, secret in enumerate(report.secrets):
        details: dict[str, Any] = {
            "category": secret.category,
            "start_line": secret.start_line,
            "end_line": secret.end_line,
        }
        yield (
            scan_id,
            kind,
            ordinal,
            secret.severity,
            _cut(secret.rule_id, _IDENTIFIER_LENGTH),
            secret.target,
            "secret",
            None,
            None,
            None,
            None,
            secret.title,
            None,
            _details(details),
        )
    kind = FindingKind.MISCONFIGURATION.value
    for ordinal, misconfiguration in enumerate(report.misconfigurations):
        details = {"message": misconfiguration.message, "resolution": misconfiguration.resolution}
        yield (
            scan_id,
            kind,
            ordinal,
            misconfiguration.severity,
            _cut(misconfiguration.id, _IDENTIFIER_LENGTH),
            misconfiguration.target,
            "config",
            _cut(misconfiguration.target_type, _SHORT_LENGTH),
            None,
            None,
            None,
            misconfiguration.title,
            misconfiguration.primary_url,
            _details(details),
        )
    kind = FindingKind.LICENSE.value
    for ordinal, license_ in enumerate(report.licenses):
        details = {
            "category": license_.category,
            "package_path": license_.package_path,
            "confidence": license_.confidence,
        }
        yield (
            scan_id,
            kind,
            ordinal,
            license_.severity,
            _cut(license_.name, _IDENTIFIER_LENGTH),
            license_.target,
            _cut(license_.target_class, _SHORT_LENGTH),
            None,
            license_.package,
            None,
            None,
            # The identifier column is cut to fit; the title keeps a long name whole.
            license_.name,
            license_.link,
            _details(details),
        )


# The findings columns each row fills, in order. The `id` column takes its default.
_COLUMNS = (
    "scan_id",
    "kind",
    "ordinal",
    "severity",
    "identifier",
    "target",
    "target_class",
    "package_type",
    "package_name",
    "installed_version",
    "fixed_version",
    "title",
    "primary_url",
    "details",
)
_COPY_FINDINGS = f"COPY findings ({', '.join(_COLUMNS)}) FROM STDIN"
_INSERT_FINDINGS = (
    f"INSERT INTO findings ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"  # noqa: S608 - fixed column names
)


async def _driver_connection(session: AsyncSession) -> Any:
    """Return the DBAPI driver's connection under the session, in the session's transaction."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if driver is None:
        raise RuntimeError("cannot write findings: the session's database connection is closed")
    return driver


async def _copy_findings(session: AsyncSession, rows: Iterator[tuple[Any, ...]]) -> None:
    """Write findings rows with PostgreSQL's COPY, in the session's transaction.

    For 3,200 rows COPY took 40-50 ms where batched INSERTs took 140-200 ms
    (one measurement on a loaded machine). It runs on the psycopg connection
    under the session's connection, so the rows commit or roll back with
    everything else the session writes.
    """
    driver = await _driver_connection(session)
    async with driver.cursor() as cursor, cursor.copy(_COPY_FINDINGS) as copy:
        for row in rows:
            await copy.write_row(row)


async def _insert_findings_sqlite(session: AsyncSession, rows: Iterator[tuple[Any, ...]]) -> None:
    """Write findings rows with one prepared INSERT run by sqlite3's executemany.

    The statement runs on the aiosqlite connection under the session, in its
    transaction, and binds plain tuples, so SQLAlchemy does no work per row.
    """
    driver = await _driver_connection(session)
    await driver.executemany(_INSERT_FINDINGS, list(rows))


async def store_results(
    session: AsyncSession,
    *,
    scan: Scan,
    report: ParsedReport,
    trivy_version: str | None = None,
    db_updated_at: datetime | None = None,
) -> bool:
    """Write a scan's findings, results document and summary, and mark it completed.

    Flushes but does not commit: the caller commits, so everything lands in
    one transaction. Returns False and changes nothing when the scan has
    ended already (completed or failed). So calling it twice for one scan, as
    a restarted operator may, stores the results once.

    ``trivy_version`` defaults to the version written in the report.
    ``scan`` must belong to ``session``; its row is locked (SELECT ... FOR
    UPDATE on PostgreSQL) so two concurrent calls cannot both write.
    """
    await session.refresh(scan, with_for_update=True)
    if ScanStatus(scan.status).is_final:
        return False
    existing = await session.scalar(select(ScanReport.scan_id).where(ScanReport.scan_id == scan.id))
    if existing is not None:
        return False

    trivy_version = trivy_version or report.trivy_version
    # The document is built in a thread while the rows are written: both spend most of their
    # time in C code that releases the GIL (zlib, the database driver).
    building = asyncio.ensure_future(
        asyncio.to_thread(
            build_results_document,
            report,
            trivy_version=trivy_version,
            db_updated_at=db_updated_at,
        )
    )
    try:
        # No findings of this scan can exist without its report row, but a row
        # written by hand or by an older version must not be doubled.
        await session.execute(delete(Finding).where(Finding.scan_id == scan.id))
        rows = _finding_rows(scan.id, report)
        if session.get_bind().dialect.name == "postgresql":
            await _copy_findings(session, rows)
        else:
            await _insert_findings_sqlite(session, rows)
    finally:
        # Awaited on failure too, so the thread never outlives the transaction unobserved.
        document = await building
    session.add(ScanReport(**_report_values(scan.id, report, document)))
    for name, value in _completed_values(report, trivy_version, db_updated_at).items():
        setattr(scan, name, value)
    await session.flush()
    _log_stored(scan.id, report, document)
    return True


def store_results_sync(
    connection: Connection,
    *,
    scan_id: str,
    worker_id: str,
    report: ParsedReport,
    trivy_version: str | None = None,
    db_updated_at: datetime | None = None,
) -> bool:
    """Do what ``store_results`` does, on a synchronous connection, for a scan ``worker_id`` runs.

    For the local executor on SQLite: it runs in one worker thread, so the
    scan's end costs one hand-off to a thread instead of one per statement.
    Writes in the connection's transaction; the caller commits. Returns False
    and writes nothing when the scan is no longer running for ``worker_id``.
    The conditional update comes first, so the transaction holds the write
    lock from its first statement and no other writer can change the row under it.
    """
    trivy_version = trivy_version or report.trivy_version
    if _finding_count(report) < THREADED_DOCUMENT_FINDINGS:
        if not _write_scan_rows(
            connection, scan_id, worker_id, report, trivy_version, db_updated_at
        ):
            return False
        document = build_results_document(
            report, trivy_version=trivy_version, db_updated_at=db_updated_at
        )
    else:
        # Leaving the block waits for the thread, on failure too, so it never outlives the call.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="secapi-store") as pool:
            # The document is built in a thread while the rows are written, as in store_results.
            building = pool.submit(
                build_results_document,
                report,
                trivy_version=trivy_version,
                db_updated_at=db_updated_at,
            )
            if not _write_scan_rows(
                connection, scan_id, worker_id, report, trivy_version, db_updated_at
            ):
                return False
            document = building.result()
    connection.execute(insert(ScanReport).values(**_report_values(scan_id, report, document)))
    # Stamped again once everything is written, as store_results stamps it after the rows.
    connection.execute(update(Scan).where(Scan.id == scan_id).values(completed_at=utcnow()))
    _log_stored(scan_id, report, document)
    return True


def _finding_count(report: ParsedReport) -> int:
    return (
        len(report.vulnerabilities)
        + len(report.secrets)
        + len(report.misconfigurations)
        + len(report.licenses)
    )


def _write_scan_rows(
    connection: Connection,
    scan_id: str,
    worker_id: str,
    report: ParsedReport,
    trivy_version: str | None,
    db_updated_at: datetime | None,
) -> bool:
    """Mark the scan completed and replace its finding rows; False if ``worker_id`` lost it."""
    updated = connection.execute(
        update(Scan)
        .where(
            Scan.id == scan_id,
            Scan.status == ScanStatus.RUNNING.value,
            Scan.worker_id == worker_id,
        )
        .values(**_completed_values(report, trivy_version, db_updated_at))
    )
    if updated.rowcount != 1:
        return False
    # As in store_results: rows written by hand or by an older version must not be doubled.
    connection.execute(delete(Finding).where(Finding.scan_id == scan_id))
    rows = list(_finding_rows(scan_id, report))
    if rows:
        connection.exec_driver_sql(_INSERT_FINDINGS, rows)
    return True


def _report_values(scan_id: str, report: ParsedReport, document: bytes) -> dict[str, Any]:
    """Return the scan_reports row of a stored report."""
    return {
        "scan_id": scan_id,
        "results_gzip": document,
        "report_sha256": report.sha256,
        "report_bytes": report.size,
        "created_at": utcnow(),
    }


def _completed_values(
    report: ParsedReport, trivy_version: str | None, db_updated_at: datetime | None
) -> dict[str, Any]:
    """Return the scan row's columns once its results are stored."""
    summary = report.summary
    return {
        "status": ScanStatus.COMPLETED.value,
        "reason": None,
        "message": None,
        "completed_at": utcnow(),
        "image_digest": _cut(report.image_digest, _DIGEST_LENGTH),
        "os_family": _cut(report.os_family, _OS_LENGTH),
        "os_name": _cut(report.os_name, _OS_LENGTH),
        "os_eosl": report.os_eosl,
        "trivy_version": _cut(trivy_version, _VERSION_LENGTH),
        "db_updated_at": db_updated_at,
        "critical": summary.critical,
        "high": summary.high,
        "medium": summary.medium,
        "low": summary.low,
        "unknown": summary.unknown,
        "secrets": summary.secrets,
        "misconfigurations": summary.misconfigurations,
        "licenses": summary.licenses,
    }


def _log_stored(scan_id: str, report: ParsedReport, document: bytes) -> None:
    summary = report.summary
    log.info(
        "scan results stored",
        scan_id=scan_id,
        vulnerabilities=summary.total,
        secrets=summary.secrets,
        misconfigurations=summary.misconfigurations,
        licenses=summary.licenses,
        document_bytes=len(document),
    )


async def read_results_document(session: AsyncSession, *, scan_id: str) -> bytes | None:
    """Return the uncompressed results document of a scan, or None when none is stored."""
    compressed = await session.scalar(
        select(ScanReport.results_gzip).where(ScanReport.scan_id == scan_id)
    )
    if compressed is None:
        return None
    return gzip.decompress(compressed)
