"""Long polls: GET /api/v1/scans/{id}?wait=SECONDS answers when the scan ends or the time is up.

The early answer runs a real scan (the local executor and Trivy against the
bed's fixture image). Rows of executor "kubernetes" stay pending here,
because no operator runs, which gives scans that do not end on their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.scans import repository
from secapi.core.scans.waiting import allow_waits, end_all_waits
from secapi.core.settings import Settings
from tests.api.conftest import Account, register, submit_scan

ALPINE = "fixtures/alpine:3.17"


async def _add_pending_row(settings: Settings, account: Account) -> str:
    """Insert a pending scan that no worker of this test claims, and return its id."""
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine)() as session:
            scan = await repository.add_scan(
                session,
                user_id=account.user_id,
                image="127.0.0.1:5000/fixtures/alpine:3.17",
                options={},
                priority=0,
                executor="kubernetes",
            )
            await session.commit()
            return scan.id
    finally:
        await engine.dispose()


async def _fail_row(settings: Settings, scan_id: str) -> None:
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine)() as session:
            assert await repository.mark_failed(
                session, scan_id=scan_id, reason="ScannerError", message="failed by the test"
            )
            await session.commit()
    finally:
        await engine.dispose()


async def test_wait_returns_when_the_scan_ends(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    scan_id = await submit_scan(client, account, f"{registry}/{ALPINE}")

    started = time.monotonic()
    response = await client.get(f"/api/v1/scans/{scan_id}?wait=60", headers=account.headers)
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed"
    assert body["results"]["vulnerabilities"], "the full results come with the answer"
    assert elapsed < 50, f"the wait took {elapsed:.1f} s, nearly its whole limit"

    # A wait that starts on an ended scan answers at once.
    started = time.monotonic()
    again = await client.get(
        f"/api/v1/scans/{scan_id}?wait=60&include_findings=false", headers=account.headers
    )
    assert again.status_code == 200
    assert again.json()["status"] == "completed"
    assert time.monotonic() - started < 5


async def test_wait_times_out_with_the_current_state(
    client: httpx.AsyncClient, make_settings: Callable[..., Settings]
) -> None:
    account = await register(client)
    scan_id = await _add_pending_row(make_settings(), account)

    before = await client.get(f"/api/v1/scans/{scan_id}", headers=account.headers)
    remaining = int(before.headers["X-RateLimit-Remaining"])
    started = time.monotonic()
    response = await client.get(f"/api/v1/scans/{scan_id}?wait=2", headers=account.headers)
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "pending"
    assert response.json()["queue_position"] >= 1
    assert 1.9 <= elapsed < 10, f"the wait took {elapsed:.1f} s instead of about 2"
    # The whole wait counts as one request.
    assert int(response.headers["X-RateLimit-Remaining"]) == remaining - 1


async def test_wait_sees_an_end_recorded_elsewhere(
    client: httpx.AsyncClient, make_settings: Callable[..., Settings]
) -> None:
    """A scan ended by another process sends no notice; the periodic status read finds it."""
    settings = make_settings()
    account = await register(client)
    scan_id = await _add_pending_row(settings, account)

    async def fail_soon() -> None:
        await asyncio.sleep(1.5)
        await _fail_row(settings, scan_id)

    started = time.monotonic()
    waiting = asyncio.create_task(
        client.get(f"/api/v1/scans/{scan_id}?wait=30", headers=account.headers)
    )
    await fail_soon()
    response = await waiting
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "failed"
    assert response.json()["message"] == "failed by the test"
    assert elapsed < 10, f"the wait took {elapsed:.1f} s; the end should be seen within about 1 s"


async def test_wait_bounds(client: httpx.AsyncClient) -> None:
    account = await register(client)
    for value in ("61", "-1", "soon"):
        response = await client.get(
            f"/api/v1/scans/00000000-0000-0000-0000-000000000000?wait={value}",
            headers=account.headers,
        )
        assert response.status_code == 422, (value, response.text)
        assert response.json()["error"]["field"] == "query.wait"


async def test_wait_on_a_missing_scan_is_not_found(client: httpx.AsyncClient) -> None:
    account = await register(client)
    started = time.monotonic()
    response = await client.get(
        "/api/v1/scans/00000000-0000-0000-0000-000000000000?wait=30", headers=account.headers
    )
    assert response.status_code == 404
    assert time.monotonic() - started < 5


async def _scan_reads(client: httpx.AsyncClient, account: Account) -> list[tuple[str, str]]:
    """Return the (resource_id, outcome) of the account's scan.read events, oldest first."""
    response = await client.get("/api/v1/audit?action=scan.read", headers=account.headers)
    assert response.status_code == 200, response.text
    return [(item["resource_id"], item["outcome"]) for item in reversed(response.json()["items"])]


async def _until_read_recorded(client: httpx.AsyncClient, account: Account) -> None:
    """Wait up to 10 s for the account's first scan.read event."""
    for _ in range(200):
        if await _scan_reads(client, account):
            return
        await asyncio.sleep(0.05)


async def test_wait_records_read_before_waiting(
    client: httpx.AsyncClient, make_settings: Callable[..., Settings]
) -> None:
    """A long poll writes its scan.read event when it finds the scan, not after the scan ends."""
    settings = make_settings()
    account = await register(client)
    scan_id = await _add_pending_row(settings, account)

    waiting = asyncio.create_task(
        client.get(f"/api/v1/scans/{scan_id}?wait=30", headers=account.headers)
    )
    await _until_read_recorded(client, account)
    recorded_while_waiting = await _scan_reads(client, account)
    assert not waiting.done(), "the scan is still pending, so the long poll must still wait"
    await _fail_row(settings, scan_id)
    response = await waiting

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "failed"
    assert recorded_while_waiting == [(scan_id, "success")]
    assert await _scan_reads(client, account) == [(scan_id, "success")]


async def test_wait_on_deleted_scan_records_failure(
    client: httpx.AsyncClient, make_settings: Callable[..., Settings]
) -> None:
    """A scan deleted during the wait: the read was recorded on entry, and the 404 after it."""
    account = await register(client)
    scan_id = await _add_pending_row(make_settings(), account)

    waiting = asyncio.create_task(
        client.get(f"/api/v1/scans/{scan_id}?wait=30", headers=account.headers)
    )
    await _until_read_recorded(client, account)
    deleted = await client.delete(f"/api/v1/scans/{scan_id}", headers=account.headers)
    response = await waiting

    assert deleted.status_code == 204, deleted.text
    assert response.status_code == 404, response.text
    assert await _scan_reads(client, account) == [(scan_id, "success"), (scan_id, "failure")]


async def test_stopping_server_ends_waits(
    client: httpx.AsyncClient, make_settings: Callable[..., Settings]
) -> None:
    """end_all_waits, which a stop signal runs, ends open and later long polls at once."""
    account = await register(client)
    scan_id = await _add_pending_row(make_settings(), account)
    url = f"/api/v1/scans/{scan_id}?include_findings=false&wait=60"
    waiting = asyncio.create_task(client.get(url, headers=account.headers))
    await asyncio.sleep(0.5)
    assert not waiting.done()

    try:
        end_all_waits()
        started = time.monotonic()
        response = await asyncio.wait_for(waiting, timeout=10)
        later = await asyncio.wait_for(client.get(url, headers=account.headers), timeout=10)
        elapsed = time.monotonic() - started
    finally:
        allow_waits()

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "pending"
    assert later.status_code == 200, later.text
    assert later.json()["status"] == "pending"
    # Both returned long before the 60 s they requested.
    assert elapsed < 10
