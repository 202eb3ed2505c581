"""Registration, API key lifecycle and authentication failures."""

from __future__ import annotations

import re

import httpx
from sqlalchemy import select

from secapi.core.auth import hash_api_key
from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.db.models import ApiKey
from tests.api.conftest import TEST_SECRET_KEY, ClientFactory, new_email, register

KEY_FORMAT = re.compile(r"sk_[a-z0-9]{10}_[A-Za-z0-9_-]{43}")


async def test_register_returns_key_once(client: httpx.AsyncClient) -> None:
    email = new_email()
    response = await client.post("/api/v1/auth/register", json={"email": email})

    assert response.status_code == 201
    body = response.json()
    assert body["email"] == email
    assert body["tier"] == "free"
    assert KEY_FORMAT.fullmatch(body["api_key"])
    assert body["api_key"].startswith(f"sk_{body['key_prefix']}_")
    assert set(body) == {"user_id", "email", "tier", "api_key", "key_prefix"}

    keys = await client.get("/api/v1/auth/keys", headers={"X-API-Key": body["api_key"]})
    assert keys.status_code == 200
    assert body["api_key"] not in keys.text
    assert "api_key" not in keys.json()["items"][0]


async def test_register_normalizes_email_case(client: httpx.AsyncClient) -> None:
    email = new_email("Mixed.Case").replace("example.com", "Example.COM")
    account = await register(client, email)
    assert account.email == email.lower()

    again = await client.post("/api/v1/auth/register", json={"email": email.lower()})
    assert again.status_code == 409


async def test_duplicate_email_conflict(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.post("/api/v1/auth/register", json={"email": account.email})

    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "email_taken"
    assert account.user_id not in response.text
    assert account.prefix not in response.text


async def test_register_rejects_invalid_email(client: httpx.AsyncClient) -> None:
    for email in ("not-an-email", "a@b", "two@@example.com", "space @example.com"):
        response = await client.post("/api/v1/auth/register", json={"email": email})

        assert response.status_code == 422, email
        error = response.json()["error"]
        assert error["field"] == "body.email", email
        assert f"invalid email address: {email!r}" in error["message"], email
        # The pattern belongs in the OpenAPI document, not in the message.
        assert "\\s" not in error["message"], email
        assert "^" not in error["message"], email
        assert error["errors"][0]["message"].startswith(f"invalid email address: {email!r}")


async def test_register_validation_names_field(client: httpx.AsyncClient) -> None:
    missing = await client.post("/api/v1/auth/register", json={})
    assert missing.status_code == 422
    assert missing.json()["error"]["field"] == "body.email"
    assert "missing" in missing.json()["error"]["message"]

    wrong_type = await client.post("/api/v1/auth/register", json={"email": 42})
    assert wrong_type.status_code == 422
    assert wrong_type.json()["error"]["field"] == "body.email"
    assert "42" in wrong_type.json()["error"]["message"]

    extra = await client.post("/api/v1/auth/register", json={"email": new_email(), "tier": "pro"})
    assert extra.status_code == 422
    assert extra.json()["error"]["field"] == "body.tier"

    broken = await client.post(
        "/api/v1/auth/register",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert broken.status_code == 422
    assert broken.json()["error"]["code"] == "invalid_input"


async def test_registration_closed_forbidden(
    make_client: ClientFactory, make_settings: object
) -> None:
    client = await make_client(make_settings(registration_open=False))  # type: ignore[operator]
    response = await client.post("/api/v1/auth/register", json={"email": new_email()})

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "registration_closed"


async def test_me_shows_account_and_limits(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.get("/api/v1/auth/me", headers=account.headers)

    assert response.status_code == 200
    body = response.json()
    assert body["user_id"] == account.user_id
    assert body["email"] == account.email
    assert body["tier"] == "free"
    assert body["limits"]["requests_per_minute"] == 10_000
    assert body["rate_limit_enabled"] is True


async def test_key_lifecycle(client: httpx.AsyncClient) -> None:
    account = await register(client)

    created = await client.post("/api/v1/auth/keys", json={"name": "ci"}, headers=account.headers)
    assert created.status_code == 201
    second = created.json()
    assert second["name"] == "ci"
    assert second["active"] is True
    assert KEY_FORMAT.fullmatch(second["api_key"])

    me = await client.get("/api/v1/auth/me", headers={"X-API-Key": second["api_key"]})
    assert me.status_code == 200
    assert me.json()["user_id"] == account.user_id

    listing = await client.get("/api/v1/auth/keys", headers=account.headers)
    assert [item["name"] for item in listing.json()["items"]] == ["default", "ci"]
    first_id = listing.json()["items"][0]["key_id"]

    revoked = await client.delete(
        f"/api/v1/auth/keys/{first_id}", headers={"X-API-Key": second["api_key"]}
    )
    assert revoked.status_code == 204
    assert revoked.content == b""

    old = await client.get("/api/v1/auth/me", headers=account.headers)
    assert old.status_code == 401

    listing = await client.get("/api/v1/auth/keys", headers={"X-API-Key": second["api_key"]})
    states = {item["key_id"]: item for item in listing.json()["items"]}
    assert states[first_id]["active"] is False
    assert states[first_id]["revoked_at"] is not None

    again = await client.delete(
        f"/api/v1/auth/keys/{first_id}", headers={"X-API-Key": second["api_key"]}
    )
    assert again.status_code == 204


async def test_key_create_without_body(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.post("/api/v1/auth/keys", headers=account.headers)

    assert response.status_code == 201
    assert response.json()["name"] == "default"


async def test_last_active_key_not_revocable(client: httpx.AsyncClient) -> None:
    account = await register(client)
    listing = await client.get("/api/v1/auth/keys", headers=account.headers)
    key_id = listing.json()["items"][0]["key_id"]

    response = await client.delete(f"/api/v1/auth/keys/{key_id}", headers=account.headers)

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "last_active_key"
    still = await client.get("/api/v1/auth/me", headers=account.headers)
    assert still.status_code == 200


async def test_revoke_unknown_key_not_found(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.delete(
        "/api/v1/auth/keys/00000000-0000-0000-0000-000000000000", headers=account.headers
    )
    assert response.status_code == 404


async def test_authentication_failures(client: httpx.AsyncClient) -> None:
    account = await register(client)
    wrong_secret = account.key[:-4] + ("AAAA" if not account.key.endswith("AAAA") else "BBBB")
    unknown_prefix = "sk_0000000000_" + account.key.split("_", 2)[2]
    cases = {
        "missing": None,
        "empty": "",
        "malformed": "not-a-key",
        "wrong secret": wrong_secret,
        "unknown prefix": unknown_prefix,
    }
    for case, key in cases.items():
        headers = {} if key is None else {"X-API-Key": key}
        response = await client.get("/api/v1/scans", headers=headers)
        assert response.status_code == 401, case
        assert response.headers["WWW-Authenticate"] == "APIKey", case
        assert response.json()["error"]["code"] == "unauthenticated", case
        if key:
            assert key not in response.text, case


async def test_only_hmac_of_key_stored(client: httpx.AsyncClient, make_settings: object) -> None:
    account = await register(client)
    settings = make_settings()  # type: ignore[operator]
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine)() as session:
            rows = (
                (await session.execute(select(ApiKey).where(ApiKey.user_id == account.user_id)))
                .scalars()
                .all()
            )
    finally:
        await engine.dispose()

    assert len(rows) == 1
    assert rows[0].prefix == account.prefix
    assert rows[0].key_hash == hash_api_key(account.key, secret=TEST_SECRET_KEY.encode())
    assert account.key.split("_", 2)[2] not in rows[0].key_hash


async def test_keys_fail_under_another_secret_key(
    make_client: ClientFactory, make_settings: object
) -> None:
    first = await make_client()
    account = await register(first)
    other = await make_client(make_settings(secret_key="another-" + "s" * 40))  # type: ignore[operator]

    response = await other.get("/api/v1/auth/me", headers=account.headers)
    assert response.status_code == 401
