"""Fixtures of the scan tests: the bed's Trivy, registry and DB, databases, users, settings.

Tests that touch a database run twice, against PostgreSQL (a new database in
the test bed's server) and against an SQLite file.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.db.migrate import upgrade_to_head
from secapi.core.db.models import User
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.process import trivy_environment
from secapi.core.scans.trivy import build_scan_command
from secapi.core.settings import ScannerSettings, Settings, Tier, TierLimits, TierSettings
from tests.testbed.bed import Testbed

UserFactory = Callable[..., Awaitable[User]]
ReportFactory = Callable[..., Path]


@dataclass(frozen=True)
class Database:
    url: str
    backend: str


@pytest.fixture(scope="session")
def trivy_bin(testbed: Testbed) -> str:
    return testbed.env["TRIVY_BIN"]


@pytest.fixture(scope="session")
def trivy_cache(testbed: Testbed) -> Path:
    """The bed's Trivy cache folder, whose db/ contains the fixture vulnerability DB."""
    return Path(testbed.env["SECAPI_TEST_TRIVY_CACHE"])


@pytest.fixture(scope="session")
def registry(testbed: Testbed) -> str:
    return testbed.registry


@pytest.fixture(scope="session")
def trivy_report(
    trivy_bin: str, trivy_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> ReportFactory:
    """Return a function that runs Trivy on an image and returns the JSON report's path."""
    folder = tmp_path_factory.mktemp("reports")
    made: dict[tuple[str, tuple[str, ...]], Path] = {}

    def make(image: str, *, options: ScanOptions | None = None) -> Path:
        options = options or ScanOptions()
        key = (image, tuple(options.model_dump_json()))
        if key in made:
            return made[key]
        output = folder / f"report-{len(made)}.json"
        command = build_scan_command(
            trivy_bin=trivy_bin,
            image=image,
            output=output,
            options=options,
            scanner=ScannerSettings(offline=True, insecure_registries=True),
            cache_dir=trivy_cache,
            timeout_seconds=300,
        )
        result = subprocess.run(
            command, capture_output=True, text=True, env=trivy_environment(os.environ), timeout=600
        )
        assert result.returncode == 0, result.stderr
        made[key] = output
        return output

    return make


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def database(
    request: pytest.FixtureRequest, testbed: Testbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    """Create an empty database, migrate it to head, and drop it after the module."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "secapi.db"
        url = f"sqlite:///{path}"
        upgrade_to_head(Settings(database_url=url, data_dir=path.parent))
        yield Database(url=url, backend="sqlite")
        return

    admin_url = testbed.env["DATABASE_URL"]
    name = f"secapi_scans_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_to_head(Settings(database_url=url))
        yield Database(url=url, backend="postgresql")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tiers(**free: int) -> TierSettings:
    """Return tier settings whose free tier has the given limits and generous defaults."""
    values = {
        "requests_per_minute": 10_000,
        "scans_per_hour": 10_000,
        "concurrent_scans": 1000,
        "queue_priority": 0,
    }
    values.update(free)
    return TierSettings(
        free=TierLimits(**values),
        pro=TierLimits(
            requests_per_minute=10_000,
            scans_per_hour=10_000,
            concurrent_scans=1000,
            queue_priority=10,
        ),
    )


@pytest.fixture
def make_settings(
    database: Database, trivy_bin: str, trivy_cache: Path, tmp_path: Path
) -> Callable[..., Settings]:
    """Return a factory of settings for this test's database; ``scanner`` merges into the defaults."""

    def make(*, scanner: dict[str, Any] | None = None, **overrides: Any) -> Settings:
        scanner_values: dict[str, Any] = {
            "trivy_bin": trivy_bin,
            "cache_dir": str(trivy_cache),
            "offline": True,
            "insecure_registries": True,
            "max_concurrent_scans": 2,
            "timeout_seconds": 120,
        }
        scanner_values.update(scanner or {})
        values: dict[str, Any] = {
            "environment": "development",
            "database_url": database.url,
            "redis_url": None,
            "data_dir": tmp_path / "data",
            "executor": "local",
            "tiers": tiers(),
            "scanner": scanner_values,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest_asyncio.fixture
async def session_factory(database: Database) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(Settings(database_url=database.url))
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def make_user(session_factory: async_sessionmaker[AsyncSession]) -> UserFactory:
    """Return a factory that inserts a user of a tier and returns it."""

    async def make(tier: Tier = Tier.FREE) -> User:
        async with session_factory() as session:
            user = User(email=f"scan-{uuid.uuid4().hex[:10]}@example.com", tier=tier.value)
            session.add(user)
            await session.commit()
            return user

    return make
