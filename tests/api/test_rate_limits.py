"""Rate limits with tiny configured values, on in-memory storage and on the bed's Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from secapi.core.settings import Settings
from tests.api.conftest import ClientFactory, new_email, register, tiers

RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


@pytest.fixture(params=["memory", "redis"])
def limited(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> Callable[..., Settings]:
    """Return a settings factory using memory or Redis counters."""
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def make(**overrides: Any) -> Settings:
        return make_settings(redis_url=redis_url, **overrides)

    return make


def _assert_limited(response: httpx.Response, *, limit: int) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    assert response.headers["X-RateLimit-Limit"] == str(limit)
    assert response.headers["X-RateLimit-Remaining"] == "0"
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 3600
    reset = int(response.headers["X-RateLimit-Reset"])
    assert time.time() - 2 <= reset <= time.time() + 3601


async def test_requests_per_minute(
    make_client: ClientFactory, limited: Callable[..., Settings]
) -> None:
    client = await make_client(limited(tiers=tiers(requests_per_minute=3)))
    account = await register(client)

    remaining = []
    for _ in range(3):
        response = await client.get("/api/v1/auth/me", headers=account.headers)
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert 0 < int(response.headers["X-RateLimit-Reset"]) - time.time() <= 61
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
    assert remaining == [2, 1, 0]

    refused = await client.get("/api/v1/scans", headers=account.headers)
    _assert_limited(refused, limit=3)
    assert int(refused.headers["Retry-After"]) <= 60

    other = await register(client)
    assert (await client.get("/api/v1/auth/me", headers=other.headers)).status_code == 200


async def test_limit_follows_tier(
    make_client: ClientFactory, limited: Callable[..., Settings]
) -> None:
    client = await make_client(limited(tiers=tiers(requests_per_minute=2)))
    account = await register(client)

    response = await client.get("/api/v1/auth/me", headers=account.headers)
    assert response.json()["limits"]["requests_per_minute"] == 2
    assert response.headers["X-RateLimit-Limit"] == "2"


async def test_rate_limited_request_audited_once(
    make_client: ClientFactory, limited: Callable[..., Settings]
) -> None:
    settings = limited(tiers=tiers(requests_per_minute=2))
    client = await make_client(settings)
    account = await register(client)
    for _ in range(5):
        await client.get("/api/v1/auth/me", headers=account.headers)

    # A second app on the same database, without limits, reads the trail.
    reader = await make_client(limited(rate_limit_enabled=False))
    events = (await reader.get("/api/v1/audit", headers=account.headers)).json()["items"]
    limited_events = [event for event in events if event["action"] == "rate_limit.exceed"]
    assert len(limited_events) == 1
    assert limited_events[0]["outcome"] == "denied"
    assert limited_events[0]["details"]["limit"] == "requests_per_minute"
    assert limited_events[0]["details"]["path"] == "/api/v1/auth/me"


async def test_registrations_per_address(
    make_client: ClientFactory, limited: Callable[..., Settings]
) -> None:
    settings = limited(rate_limits={"registrations_per_hour": 2})
    client = await make_client(settings)
    other_address = await make_client(settings, address="127.0.0.9")

    for _ in range(2):
        await register(client)
    refused = await client.post("/api/v1/auth/register", json={"email": new_email()})
    _assert_limited(refused, limit=2)
    assert "registrations per hour" in refused.json()["error"]["message"]

    if settings.redis_url is not None:
        # Redis counters are shared by every app, so the other address is counted apart.
        await register(other_address)


async def test_failed_authentications_per_address(
    make_client: ClientFactory, limited: Callable[..., Settings]
) -> None:
    settings = limited(rate_limits={"failed_authentications_per_minute": 3})
    client = await make_client(settings)
    account = await register(client)

    for _ in range(3):
        response = await client.get("/api/v1/auth/me", headers={"X-API-Key": "sk_bad"})
        assert response.status_code == 401
    blocked = await client.get("/api/v1/auth/me", headers={"X-API-Key": "sk_bad"})
    _assert_limited(blocked, limit=3)

    # Past the limit even a valid key gets 429, so guesses reveal nothing.
    valid = await client.get("/api/v1/auth/me", headers=account.headers)
    assert valid.status_code == 429


async def test_shared_counters_with_redis(
    make_client: ClientFactory, make_settings: Callable[..., Settings], redis_url: str
) -> None:
    settings = make_settings(redis_url=redis_url, tiers=tiers(requests_per_minute=4))
    first = await make_client(settings)
    second = await make_client(settings)
    account = await register(first)

    for client in (first, second, first, second):
        assert (await client.get("/api/v1/auth/me", headers=account.headers)).status_code == 200
    refused = await second.get("/api/v1/auth/me", headers=account.headers)
    _assert_limited(refused, limit=4)

    client = redis.Redis.from_url(redis_url)
    try:
        keys = [key.decode() for key in client.keys("*")]
    finally:
        client.close()
    assert any(account.user_id in key for key in keys)
    assert all(account.key not in key for key in keys)


async def test_disabled_limits_allow_everything(
    make_client: ClientFactory, limited: Callable[..., Settings]
) -> None:
    client = await make_client(
        limited(
            rate_limit_enabled=False,
            tiers=tiers(requests_per_minute=1),
            rate_limits={"registrations_per_hour": 1, "failed_authentications_per_minute": 1},
        )
    )
    account = await register(client)
    await register(client)
    for _ in range(3):
        response = await client.get("/api/v1/auth/me", headers=account.headers)
        assert response.status_code == 200
        assert "X-RateLimit-Limit" not in response.headers
        bad = await client.get("/api/v1/auth/me", headers={"X-API-Key": "sk_bad"})
        assert bad.status_code == 401


async def test_redis_outage_lets_requests_through(
    make_client: ClientFactory, make_settings: Callable[..., Settings]
) -> None:
    # Nothing listens on port 9 of loopback, so every Redis call fails at once.
    client = await make_client(
        make_settings(redis_url="redis://127.0.0.1:9/0", tiers=tiers(requests_per_minute=1))
    )
    account = await register(client)
    for _ in range(2):
        response = await client.get("/api/v1/auth/me", headers=account.headers)
        assert response.status_code == 200
        assert "X-RateLimit-Limit" not in response.headers

    ready = await client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"] != "ok"
    assert ready.json()["checks"]["database"] == "ok"


def test_one_tier_field_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECAPI_TIERS__PRO__SCANS_PER_HOUR", "7")
    monkeypatch.setenv("SECAPI_RATE_LIMITS__REGISTRATIONS_PER_HOUR", "3")

    settings = Settings()

    assert settings.tiers.pro.scans_per_hour == 7
    assert settings.tiers.pro.requests_per_minute == 600
    assert settings.tiers.free.scans_per_hour == 30
    assert settings.rate_limits.registrations_per_hour == 3
    assert settings.rate_limits.failed_authentications_per_minute == 30
