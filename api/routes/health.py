"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import structlog
from fastapi import APIRouter, Response, status
from limits.errors import StorageError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from secapi import __version__
from secapi.api.deps import Parts
from secapi.api.schemas import Health, Readiness
from secapi.core.errors import ServiceUnavailableError

log = structlog.get_logger(__name__)

router = APIRouter(tags=["health"])

# Each readiness check gets this many seconds, so a hung dependency cannot hang the probe.
CHECK_TIMEOUT = 5.0
OK = "ok"


@router.get("/health", response_model=Health, summary="Tell whether the process is alive")
async def health() -> Health:
    """Return at once without touching any dependency, for liveness probes."""
    return Health(status="ok", version=__version__)


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Tell whether the API can serve requests",
    responses={
        503: {"model": Readiness, "description": "A dependency failed; `checks` says which."}
    },
)
async def ready(parts: Parts, response: Response) -> Readiness:
    """Check the database, Redis (when configured) and the scan executor."""
    checks = {"database": await _check(_database(parts), "database")}
    if parts.limiter.uses_redis:
        checks["redis"] = await _check(parts.limiter.check_storage(), "redis")
    checks["executor"] = await _check(parts.executor.check_ready(), "executor")

    if all(value == OK for value in checks.values()):
        return Readiness(status="ready", checks=checks)
    response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(status="unavailable", checks=checks)


async def _database(parts: Parts) -> None:
    async with parts.session_factory() as session:
        await session.execute(text("SELECT 1"))


async def _check(probe: Awaitable[None], name: str) -> str:
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except ServiceUnavailableError as error:
        return error.message
    except StorageError:
        return "Redis does not answer; check REDIS_URL and the Redis server"
    except SQLAlchemyError as error:
        # The driver's message can hold the connection URL, so only the class is shown.
        log.warning("readiness check failed", check=name, error_type=type(error).__name__)
        return f"the database cannot be reached ({type(error).__name__}); check DATABASE_URL"
    except OSError as error:
        return f"{name} cannot be reached: {error.strerror or type(error).__name__}"
    return OK
