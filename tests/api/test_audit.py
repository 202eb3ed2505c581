"""The audit trail: what is recorded, who can read it, and that it is append-only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError

from secapi.core.audit import client_address, parse_networks
from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.db.models import AuditEvent
from secapi.core.settings import Settings
from tests.api.conftest import ClientFactory, register, submit_scan, wait_for_scan


async def _events(client: httpx.AsyncClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/audit?page_size=100", headers=headers)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def _all_rows(settings: Settings) -> list[AuditEvent]:
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine)() as session:
            return list((await session.execute(select(AuditEvent))).scalars())
    finally:
        await engine.dispose()


async def test_account_actions_recorded(client: httpx.AsyncClient) -> None:
    account = await register(client)
    created = await client.post("/api/v1/auth/keys", json={"name": "ci"}, headers=account.headers)
    second = created.json()
    revoked = await client.delete(f"/api/v1/auth/keys/{second['key_id']}", headers=account.headers)
    assert revoked.status_code == 204

    events = await _events(client, account.headers)
    actions = [event["action"] for event in events]
    assert actions == ["api_key.revoke", "api_key.create", "user.register"]

    revoke, create, register_event = events
    assert register_event["resource_type"] == "user"
    assert register_event["resource_id"] == account.user_id
    assert register_event["details"]["key_prefix"] == account.prefix
    assert create["resource_id"] == second["key_id"]
    assert create["details"] == {"key_prefix": second["key_prefix"], "name": "ci"}
    assert revoke["resource_id"] == second["key_id"]
    for event in events:
        assert event["outcome"] == "success"
        assert event["actor"] == account.email
        assert event["source_ip"] == "127.0.0.1"
        assert event["occurred_at"].endswith(("Z", "+00:00"))


async def test_failed_use_of_own_key_visible(client: httpx.AsyncClient) -> None:
    account = await register(client)
    wrong = account.key[:-1] + ("A" if account.key[-1] != "A" else "B")

    response = await client.get("/api/v1/scans", headers={"X-API-Key": wrong})
    assert response.status_code == 401

    failure = (await _events(client, account.headers))[0]
    assert failure["action"] == "auth.fail"
    assert failure["outcome"] == "denied"
    assert failure["actor"] == "anonymous"
    assert failure["details"]["key_prefix"] == account.prefix
    assert failure["details"]["reason"] == "unknown"
    assert failure["details"]["path"] == "/api/v1/scans"


async def test_revoked_key_use_recorded(client: httpx.AsyncClient) -> None:
    account = await register(client)
    created = (await client.post("/api/v1/auth/keys", headers=account.headers)).json()
    await client.delete(f"/api/v1/auth/keys/{created['key_id']}", headers=account.headers)

    response = await client.get("/api/v1/auth/me", headers={"X-API-Key": created["api_key"]})
    assert response.status_code == 401

    failure = (await _events(client, account.headers))[0]
    assert failure["action"] == "auth.fail"
    assert failure["details"]["reason"] == "revoked"
    assert failure["details"]["key_prefix"] == created["key_prefix"]


async def test_keys_never_reach_trail(
    client: httpx.AsyncClient, make_settings: Callable[..., Settings]
) -> None:
    account = await register(client)
    created = (await client.post("/api/v1/auth/keys", headers=account.headers)).json()
    wrong = account.key[:-1] + ("A" if account.key[-1] != "A" else "B")
    await client.get("/api/v1/auth/me", headers={"X-API-Key": wrong})
    await client.get("/api/v1/auth/me", headers={"X-API-Key": "garbage-" + account.key})

    rows = [row for row in await _all_rows(make_settings()) if row.user_id == account.user_id]
    assert len(rows) >= 3
    dumped = repr([(row.actor, row.resource_id, row.details) for row in rows])
    for key in (account.key, created["api_key"], wrong):
        assert key not in dumped
        assert key.split("_", 2)[2] not in dumped


async def test_malformed_key_recorded_without_prefix(
    client: httpx.AsyncClient, make_settings: Callable[..., Settings]
) -> None:
    marker = "sk_notavalidkey_marker"
    response = await client.get("/api/v1/auth/me", headers={"X-API-Key": marker})
    assert response.status_code == 401

    rows = await _all_rows(make_settings())
    failures = [row for row in rows if row.action == "auth.fail" and row.user_id is None]
    assert failures
    assert all(marker not in repr(row.details) for row in failures)
    assert any(row.details.get("reason") == "malformed" for row in failures)


async def test_finding_pages_audited_once(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    scan_id = await submit_scan(client, account, f"{registry}/fixtures/alpine:3.17")
    await wait_for_scan(client, account, scan_id)
    base = f"/api/v1/scans/{scan_id}"

    remaining = []
    for page in (1, 2, 3):
        response = await client.get(
            f"{base}/vulnerabilities?page={page}&page_size=5", headers=account.headers
        )
        assert response.status_code == 200, response.text
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
    for page in (1, 2):
        response = await client.get(f"{base}/secrets?page={page}", headers=account.headers)
        assert response.status_code == 200, response.text
    missing = await client.get(
        "/api/v1/scans/no-such-scan/vulnerabilities?page=2", headers=account.headers
    )
    assert missing.status_code == 404

    # Every page still counts against the request limit.
    assert remaining == [remaining[0], remaining[0] - 1, remaining[0] - 2]
    page_reads = [
        (event["resource_id"], event["outcome"], event["details"])
        for event in await _events(client, account.headers)
        if event["action"] == "scan.read" and "findings" in event["details"]
    ]
    assert sorted(page_reads, key=str) == sorted(
        [
            (scan_id, "success", {"findings": "vulnerability"}),
            (scan_id, "success", {"findings": "secret"}),
            ("no-such-scan", "failure", {"findings": "vulnerability", "error": "not_found"}),
        ],
        key=str,
    )


async def test_openapi_documents_page_auditing(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]

    for kind in ("vulnerabilities", "secrets", "misconfigurations", "licenses"):
        description = paths[f"/api/v1/scans/{{scan_id}}/{kind}"]["get"]["description"]
        assert "`scan.read` event for page 1" in " ".join(description.split()), kind


async def test_trail_shows_only_own_events(client: httpx.AsyncClient) -> None:
    alice = await register(client)
    bob = await register(client)
    await client.post("/api/v1/auth/keys", json={"name": "alice-ci"}, headers=alice.headers)

    bob_events = await _events(client, bob.headers)
    assert [event["action"] for event in bob_events] == ["user.register"]
    assert all(event["actor"] == bob.email for event in bob_events)
    assert alice.user_id not in repr(bob_events)


async def test_trail_pages_newest_first(client: httpx.AsyncClient) -> None:
    account = await register(client)
    for name in ("one", "two", "three"):
        await client.post("/api/v1/auth/keys", json={"name": name}, headers=account.headers)

    first = await client.get("/api/v1/audit?page=1&page_size=2", headers=account.headers)
    second = await client.get("/api/v1/audit?page=2&page_size=2", headers=account.headers)
    assert first.json()["total"] == 4
    assert first.json()["page_size"] == 2
    names = [event["details"].get("name") for event in first.json()["items"]]
    assert names == ["three", "two"]
    rest = [event["action"] for event in second.json()["items"]]
    assert rest == ["api_key.create", "user.register"]

    too_big = await client.get("/api/v1/audit?page_size=101", headers=account.headers)
    assert too_big.status_code == 422
    assert too_big.json()["error"]["field"] == "query.page_size"


async def test_forwarded_for_trusted_only_from_proxies(
    make_client: ClientFactory, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(trusted_proxies=["127.0.0.2/32"])
    behind_proxy = await make_client(settings, address="127.0.0.2")
    direct = await make_client(settings, address="127.0.0.3")
    forwarded = {"X-Forwarded-For": "192.0.2.10, 127.0.0.2"}

    response = await behind_proxy.post(
        "/api/v1/auth/register", json={"email": "proxied@example.com"}, headers=forwarded
    )
    proxied_key = {"X-API-Key": response.json()["api_key"]}
    response = await direct.post(
        "/api/v1/auth/register", json={"email": "direct@example.com"}, headers=forwarded
    )
    direct_key = {"X-API-Key": response.json()["api_key"]}

    assert (await _events(behind_proxy, proxied_key))[0]["source_ip"] == "192.0.2.10"
    assert (await _events(direct, direct_key))[0]["source_ip"] == "127.0.0.3"


@pytest.mark.parametrize("statement", ["update", "delete"])
async def test_trail_rejects_changes(
    client: httpx.AsyncClient, make_settings: Callable[..., Settings], statement: str
) -> None:
    account = await register(client)
    engine = create_engine(make_settings())
    try:
        async with create_session_factory(engine)() as session:
            query = (
                update(AuditEvent).values(outcome="failure")
                if statement == "update"
                else delete(AuditEvent)
            ).where(AuditEvent.user_id == account.user_id)
            with pytest.raises(DBAPIError, match="append-only"):
                await session.execute(query)
            await session.rollback()

            count = await session.execute(
                text("SELECT count(*) FROM audit_events WHERE user_id = :user_id"),
                {"user_id": account.user_id},
            )
            assert count.scalar_one() == 1
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        ("10.0.0.5", "192.0.2.1", "192.0.2.1"),
        ("10.0.0.5", "192.0.2.1, 10.0.0.7", "192.0.2.1"),
        ("10.0.0.5", "198.51.100.2, 192.0.2.1, 10.0.0.7", "192.0.2.1"),
        ("10.0.0.5", "not-an-address, 10.0.0.7", "10.0.0.7"),
        ("10.0.0.5", None, "10.0.0.5"),
        ("192.0.2.50", "192.0.2.1", "192.0.2.50"),
        ("10.0.0.5", "10.0.0.8", "10.0.0.8"),
        (None, "192.0.2.1", None),
    ],
)
def test_client_address_walk(peer: str | None, forwarded_for: str | None, expected: str) -> None:
    trusted = parse_networks(["10.0.0.0/24"])
    assert client_address(peer=peer, forwarded_for=forwarded_for, trusted_proxies=trusted) == (
        expected
    )


def test_trusted_proxy_entry_invalid() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks(["nope"])


async def test_action_filter_keeps_only_those(client: httpx.AsyncClient) -> None:
    account = await register(client)
    for name in ("one", "two"):
        created = await client.post(
            "/api/v1/auth/keys", json={"name": name}, headers=account.headers
        )
        assert created.status_code == 201, created.text
    # A read of a missing scan is recorded too, as a failed scan.read.
    missing = "00000000-0000-4000-8000-000000000000"
    assert (
        await client.get(f"/api/v1/scans/{missing}", headers=account.headers)
    ).status_code == 404

    only_keys = await client.get("/api/v1/audit?action=api_key.create", headers=account.headers)
    repeated = await client.get(
        "/api/v1/audit?action=API_KEY.CREATE&action=user.register", headers=account.headers
    )
    commas = await client.get(
        "/api/v1/audit?action=api_key.create,user.register", headers=account.headers
    )

    assert only_keys.status_code == 200, only_keys.text
    assert [item["action"] for item in only_keys.json()["items"]] == ["api_key.create"] * 2
    assert only_keys.json()["total"] == 2
    for response in (repeated, commas):
        actions = [item["action"] for item in response.json()["items"]]
        assert actions == ["api_key.create", "api_key.create", "user.register"], actions
        assert response.json()["total"] == 3
    everything = await _events(client, account.headers)
    assert "scan.read" in [event["action"] for event in everything]


async def test_unknown_action_is_rejected(client: httpx.AsyncClient) -> None:
    account = await register(client)

    response = await client.get("/api/v1/audit?action=scan.submitted", headers=account.headers)

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "query.action"
    assert "action 'scan.submitted' is invalid" in error["message"]
    assert "scan.submit" in error["message"]
