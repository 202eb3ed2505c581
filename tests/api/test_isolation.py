"""Isolation: one user can neither see nor change another user's scans, keys or events.

Another user's scan gets the same response as a scan that does not exist.
"""

from __future__ import annotations

import httpx

from tests.api.conftest import Account, register, submit_scan, wait_for_scan

ALPINE = "fixtures/alpine:3.17"
MISSING_ID = "00000000-0000-4000-8000-000000000000"
SCAN_PATHS = (
    "/api/v1/scans/{id}",
    "/api/v1/scans/{id}?include_findings=false",
    "/api/v1/scans/{id}/vulnerabilities",
    "/api/v1/scans/{id}/secrets",
    "/api/v1/scans/{id}/misconfigurations",
)


async def _two_users_with_scan(
    client: httpx.AsyncClient, registry: str
) -> tuple[Account, Account, str]:
    alice = await register(client)
    bob = await register(client)
    scan_id = await submit_scan(client, alice, f"{registry}/{ALPINE}")
    scan = await wait_for_scan(client, alice, scan_id)
    assert scan["status"] == "completed", scan
    return alice, bob, scan_id


def _without_id(response: httpx.Response, scan_id: str) -> str:
    return response.text.replace(scan_id, "ID")


async def test_scan_reads_across_users(client: httpx.AsyncClient, registry: str) -> None:
    alice, bob, scan_id = await _two_users_with_scan(client, registry)

    for path in SCAN_PATHS:
        own = await client.get(path.format(id=scan_id), headers=alice.headers)
        assert own.status_code == 200, path

        foreign = await client.get(path.format(id=scan_id), headers=bob.headers)
        missing = await client.get(path.format(id=MISSING_ID), headers=bob.headers)
        assert foreign.status_code == 404, path
        assert missing.status_code == 404, path
        assert _without_id(foreign, scan_id) == _without_id(missing, MISSING_ID), path
        assert "fixtures/alpine" not in foreign.text, path


async def test_scan_delete_across_users(client: httpx.AsyncClient, registry: str) -> None:
    alice, bob, scan_id = await _two_users_with_scan(client, registry)

    foreign = await client.delete(f"/api/v1/scans/{scan_id}", headers=bob.headers)

    assert foreign.status_code == 404
    still = await client.get(f"/api/v1/scans/{scan_id}", headers=alice.headers)
    assert still.status_code == 200
    assert still.json()["status"] == "completed"


async def test_scan_lists_across_users(client: httpx.AsyncClient, registry: str) -> None:
    alice, bob, scan_id = await _two_users_with_scan(client, registry)

    for query in ("", "?status=completed", "?page_size=100"):
        bob_list = (await client.get(f"/api/v1/scans{query}", headers=bob.headers)).json()
        assert bob_list["items"] == [], query
        assert bob_list["total"] == 0, query

    alice_list = (await client.get("/api/v1/scans", headers=alice.headers)).json()
    assert [item["scan_id"] for item in alice_list["items"]] == [scan_id]


async def test_key_management_across_users(client: httpx.AsyncClient) -> None:
    alice = await register(client)
    bob = await register(client)
    created = (await client.post("/api/v1/auth/keys", headers=alice.headers)).json()

    bob_keys = (await client.get("/api/v1/auth/keys", headers=bob.headers)).json()["items"]
    assert [key["key_prefix"] for key in bob_keys] == [bob.prefix]

    foreign = await client.delete(f"/api/v1/auth/keys/{created['key_id']}", headers=bob.headers)
    assert foreign.status_code == 404
    works = await client.get("/api/v1/auth/me", headers={"X-API-Key": created["api_key"]})
    assert works.status_code == 200
    assert works.json()["user_id"] == alice.user_id


async def test_identity_and_trail_across_users(client: httpx.AsyncClient, registry: str) -> None:
    alice, bob, scan_id = await _two_users_with_scan(client, registry)

    me = (await client.get("/api/v1/auth/me", headers=bob.headers)).json()
    assert me["user_id"] == bob.user_id

    trail = (await client.get("/api/v1/audit?page_size=100", headers=bob.headers)).json()
    assert scan_id not in str(trail)
    assert alice.user_id not in str(trail)
    assert alice.email not in str(trail)
