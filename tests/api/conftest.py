"""Fixtures of the API tests: a fresh migrated database per module, settings, clients.

Every test module runs twice, against PostgreSQL (a new database in the test
bed's server) and against an SQLite file. Apps run in-process behind
httpx's ASGI transport, with their lifespan, so the real engine, limiter and
executor start and stop around each test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio
import redis
from sqlalchemy.engine import make_url

from secapi.api.app import create_app
from secapi.core.db.migrate import upgrade_to_head
from secapi.core.settings import Settings, TierLimits, TierSettings
from tests.testbed.bed import Testbed

TEST_SECRET_KEY = "api-tests-" + "k" * 40
SECAPI = str(Path(sys.executable).parent / "secapi")
# The API tests use their own Redis database, so flushing it touches no one else's keys.
REDIS_TEST_DB = 3
ClientFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@dataclass(frozen=True)
class Database:
    url: str
    backend: str


def _drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def database(
    request: pytest.FixtureRequest, testbed: Testbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    """Create an empty database, migrate it to head, and drop it after the module."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "secapi.db"
        database = Database(url=f"sqlite:///{path}", backend="sqlite")
        upgrade_to_head(Settings(database_url=database.url, data_dir=path.parent))
        yield database
        return

    admin_url = testbed.env["DATABASE_URL"]
    name = f"secapi_api_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    database = Database(url=url, backend="postgresql")
    try:
        upgrade_to_head(Settings(database_url=url))
        yield database
    finally:
        _drop_database(admin_url, name)


@pytest.fixture
def redis_url(testbed: Testbed) -> str:
    """The bed's Redis, on a database of the API tests' own, emptied for each test."""
    url = make_url(testbed.env["REDIS_URL"]).set(database=str(REDIS_TEST_DB))
    rendered = url.render_as_string(hide_password=False)
    client = redis.Redis.from_url(rendered)
    try:
        client.flushdb()
    finally:
        client.close()
    return rendered


def tiers(**free: int) -> TierSettings:
    """Return tier settings whose free tier has the given limits and generous defaults."""
    values = {
        "requests_per_minute": 10_000,
        "scans_per_hour": 10_000,
        "concurrent_scans": 100,
        "queue_priority": 0,
    }
    values.update(free)
    return TierSettings(free=TierLimits(**values))


@pytest.fixture
def make_settings(database: Database, testbed: Testbed, tmp_path: Path) -> Callable[..., Settings]:
    """Return a factory of settings for this test's database; keywords override fields."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "environment": "development",
            "database_url": database.url,
            "redis_url": None,
            "secret_key": TEST_SECRET_KEY,
            "data_dir": tmp_path / "data",
            "executor": "local",
            "rate_limit_enabled": True,
            "tiers": tiers(),
            "celery_broker_url": None,
            "scanner": {
                "trivy_bin": testbed.env["TRIVY_BIN"],
                "cache_dir": testbed.env["SECAPI_TEST_TRIVY_CACHE"],
                "offline": True,
                "insecure_registries": True,
                "max_concurrent_scans": 2,
                "timeout_seconds": 120,
            },
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest_asyncio.fixture
async def make_client(make_settings: Callable[..., Settings]) -> AsyncIterator[ClientFactory]:
    """Return a factory of clients, each on a running app of its own."""
    async with AsyncExitStack() as stack:

        async def make(
            settings: Settings | None = None, *, address: str = "127.0.0.1"
        ) -> httpx.AsyncClient:
            app = create_app(settings or make_settings())
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app, client=(address, 40000))
            client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
            await stack.enter_async_context(client)
            return client

        yield make


@pytest_asyncio.fixture
async def client(make_client: ClientFactory) -> httpx.AsyncClient:
    return await make_client()


@dataclass(frozen=True)
class Account:
    user_id: str
    email: str
    key: str
    prefix: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}


def new_email(label: str = "user") -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}@example.com"


async def register(client: httpx.AsyncClient, email: str | None = None) -> Account:
    """Register a new account and return it; fails the test unless the status is 201."""
    response = await client.post("/api/v1/auth/register", json={"email": email or new_email()})
    assert response.status_code == 201, response.text
    body = response.json()
    return Account(
        user_id=body["user_id"], email=body["email"], key=body["api_key"], prefix=body["key_prefix"]
    )


FINAL_STATUSES = ("completed", "failed")


async def submit_scan(
    client: httpx.AsyncClient, account: Account, image: str, **options: Any
) -> str:
    """Submit a scan and return its id; fails the test unless the status is 202."""
    response = await client.post(
        "/api/v1/scan/docker", json={"image": image, **options}, headers=account.headers
    )
    assert response.status_code == 202, response.text
    scan_id: str = response.json()["scan_id"]
    return scan_id


async def wait_for_scan(
    client: httpx.AsyncClient, account: Account, scan_id: str, *, within: float = 180
) -> dict[str, Any]:
    """Poll the scan until it is completed or failed, and return its summary view."""
    deadline = time.monotonic() + within
    while True:
        response = await client.get(
            f"/api/v1/scans/{scan_id}?include_findings=false", headers=account.headers
        )
        assert response.status_code == 200, response.text
        scan: dict[str, Any] = response.json()
        if scan["status"] in FINAL_STATUSES:
            return scan
        assert time.monotonic() < deadline, f"scan {scan_id} still {scan['status']}"
        await asyncio.sleep(0.3)


@pytest.fixture
def registry(testbed: Testbed) -> str:
    """`127.0.0.1:PORT` of the bed's registry with the fixture images."""
    return testbed.registry


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen[bytes]


def server_environment(settings: Settings) -> dict[str, str]:
    """Return the environment that gives `secapi serve` these settings."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("SECAPI_")
        and name not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "ENVIRONMENT")
    }
    env.update(
        {
            "ENVIRONMENT": settings.environment,
            "DATABASE_URL": settings.database_url or "",
            "SECRET_KEY": settings.secret_key.get_secret_value() if settings.secret_key else "",
            "RATE_LIMIT_ENABLED": str(settings.rate_limit_enabled).lower(),
            "SECAPI_DATA_DIR": str(settings.data_dir),
            "SECAPI_EXECUTOR": settings.executor,
            "SECAPI_SCANNER__TRIVY_BIN": settings.scanner.trivy_bin,
            "SECAPI_SCANNER__CACHE_DIR": str(settings.scanner.cache_dir or ""),
            "SECAPI_SCANNER__OFFLINE": str(settings.scanner.offline).lower(),
            "SECAPI_SCANNER__INSECURE_REGISTRIES": str(
                settings.scanner.insecure_registries
            ).lower(),
            "SECAPI_SCANNER__MAX_CONCURRENT_SCANS": str(settings.scanner.max_concurrent_scans),
            "SECAPI_SCANNER__TIMEOUT_SECONDS": str(settings.scanner.timeout_seconds),
        }
    )
    for tier, limits in settings.tiers.model_dump().items():
        for field, value in limits.items():
            env[f"SECAPI_TIERS__{tier.upper()}__{field.upper()}"] = str(value)
    if settings.redis_url is not None:
        env["REDIS_URL"] = settings.redis_url.get_secret_value()
    return env


def start_server(
    settings: Settings, log_path: Path, *, timeout: float = 60, port: int | None = None
) -> Server:
    """Start `secapi serve` on ``port`` or a free loopback port; wait until /health responds."""
    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    log = log_path.open("ab")
    process = subprocess.Popen(
        [SECAPI, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=server_environment(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"secapi serve exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return Server(url=url, process=process)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(Server(url=url, process=process))
    raise AssertionError(f"secapi serve did not answer within {timeout} s: {log_path.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)
