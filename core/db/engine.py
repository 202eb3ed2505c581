"""Async engine and session factory for PostgreSQL (psycopg 3) or SQLite (aiosqlite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from secapi.core.settings import Settings


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets API readers run while the executor writes; foreign keys are off by default.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_engine(settings: Settings, **overrides: Any) -> AsyncEngine:
    """Create the engine for the configured database, creating an SQLite file's folder."""
    url = make_url(settings.sqlalchemy_url())
    options: dict[str, Any] = {"pool_pre_ping": True}

    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        options = {}
    else:
        # A pool at least as large as the usual concurrency keeps overflow connections from
        # being opened and closed on every burst of requests.
        options.update(pool_size=20, max_overflow=10, pool_recycle=1800)

    options.update(overrides)
    engine = create_async_engine(url, **options)
    if url.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _set_sqlite_pragmas)
    return engine


def sync_sqlite_engine(session_factory: async_sessionmaker[AsyncSession]) -> Engine | None:
    """Return a synchronous engine on the SQLite file the sessions use, else None.

    For writes that run several statements in one worker thread: each
    statement of an async session is a hand-off to the driver's thread and
    back. None for PostgreSQL and for an in-memory database, which another
    engine cannot share.
    """
    bind = session_factory.kw.get("bind")
    if not isinstance(bind, AsyncEngine) or bind.dialect.name != "sqlite":
        return None
    url = bind.url
    if not url.database or url.database == ":memory:":
        return None
    engine = create_sync_engine(
        url.set(drivername="sqlite"), connect_args={"check_same_thread": False}
    )
    event.listen(engine, "connect", _set_sqlite_pragmas)
    return engine


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def sync_url(settings: Settings) -> str:
    """Return the synchronous URL of the same database, for Alembic."""
    url = make_url(settings.sqlalchemy_url())
    if url.drivername == "sqlite+aiosqlite":
        url = url.set(drivername="sqlite")
    return url.render_as_string(hide_password=False)
