"""The FastAPI application: routers, error handlers, middleware and the lifespan.

The lifespan creates the database engine, the rate limiter and the scan
executor, starts the executor, and stops all of them on shutdown. It changes
no schema: `secapi serve` migrates before it starts the server, and
`secapi migrate` does it on its own.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from types import FrameType
from typing import Any

import structlog
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline

from secapi import __version__
from secapi.api.deps import AppParts
from secapi.api.errors import install_error_handlers
from secapi.api.middleware import RateLimitHeadersMiddleware
from secapi.api.query import accepted_query_parameters, reject_unknown_query_parameters
from secapi.api.routes import audit, auth, health, scans
from secapi.core.audit import parse_networks
from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.executors.base import create_executor
from secapi.core.ratelimit import RateLimiter
from secapi.core.scans.documents import DocumentCache
from secapi.core.scans.waiting import allow_waits, end_all_waits
from secapi.core.settings import Settings, get_settings

log = structlog.get_logger(__name__)

# URL prefix of the locally served Swagger UI and ReDoc scripts and styles.
DOCS_ASSETS_URL = "/static/docs"

DESCRIPTION = """\
Scan container images with Trivy through one REST API.

Register with `POST /api/v1/auth/register` to get an API key, send it in the
`X-API-Key` header, submit a scan with `POST /api/v1/scan/docker`, and poll
`GET /api/v1/scans/{scan_id}` until its status is `completed` or `failed`.

Every error returns `{"error": {"code", "message", "field", "errors"}}` with all
four keys: `field` is null when no request field is at fault, and `errors` is
empty unless the request was invalid (422).
Authenticated responses carry `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
`X-RateLimit-Reset` for the caller's per-minute request limit. A 429 carries them for
the limit that was reached instead (requests per minute, scans per hour or concurrent
scans); its message names that limit.
"""


# Seconds the startup check waits for Redis to respond to PING.
REDIS_STARTUP_CHECK_SECONDS = 3
# Signals that make uvicorn stop the server gracefully.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def create_served_app() -> FastAPI:
    """Build the application that `secapi serve` runs in each uvicorn worker process."""
    return create_app(end_waits_on_stop_signals=True)


def create_app(
    settings: Settings | None = None, *, end_waits_on_stop_signals: bool = False
) -> FastAPI:
    """Build the application; nothing connects to anything until the lifespan starts.

    With ``end_waits_on_stop_signals``, SIGINT and SIGTERM also end every long
    poll at once, with the scan's current state. Uvicorn waits for open requests
    before it stops, so without this a long poll could hold a stopping server for
    as long as it asked to wait, past a pod's termination grace period.
    """
    settings = settings or get_settings()
    # Built here rather than in the lifespan, so a bad SECAPI_TRUSTED_PROXIES or REDIS_URL
    # fails `secapi serve` with a message before the server starts.
    trusted_proxies = parse_networks(settings.trusted_proxies)
    limiter = RateLimiter(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for warning in settings.warn_about_ignored():
            log.warning(warning)

        async with AsyncExitStack() as stack:
            allow_waits()
            if end_waits_on_stop_signals:
                _chain_stop_signals(stack, asyncio.get_running_loop())
            engine = create_engine(settings)
            stack.push_async_callback(engine.dispose)
            stack.push_async_callback(limiter.close)
            session_factory = create_session_factory(engine)
            executor = create_executor(settings, session_factory)
            await executor.start()
            stack.push_async_callback(executor.stop)

            app.state.parts = AppParts(
                settings=settings,
                session_factory=session_factory,
                executor=executor,
                limiter=limiter,
                trusted_proxies=trusted_proxies,
                documents=DocumentCache(settings.results_cache_bytes),
            )
            if settings.rate_limit_enabled and limiter.uses_redis:
                await _warn_if_redis_unreachable(limiter)
            log.info(
                "api started",
                executor=executor.name,
                database=engine.dialect.name,
                rate_limits=_rate_limit_mode(settings, limiter),
                environment=settings.environment,
            )
            # Building the OpenAPI document takes about 150 ms; done here, the first
            # request with query parameters does not wait for it.
            accepted_query_parameters(app)
            # Everything made so far lives as long as the process. Frozen, the collector
            # skips it in full collections, which otherwise paused the event loop for
            # tens of milliseconds at a time under load.
            gc.freeze()
            yield
        log.info("api stopped")

    # FastAPI's own /docs and /redoc load their scripts from a CDN, so they stay blank on a
    # machine without internet access. fastapi-offline serves copies from its package.
    app = FastAPIOffline(
        title="SecAPI",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS_URL,
    )
    install_error_handlers(app)
    app.add_middleware(RateLimitHeadersMiddleware)
    # Health probes are left out: monitors may add parameters of their own.
    for module in (auth, scans, audit):
        app.include_router(module.router, dependencies=[Depends(reject_unknown_query_parameters)])
    app.include_router(health.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    # FastAPI documents its own validation error body when a route declares no 422;
    # every route here declares one, so these schemas would only mislead.
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def _rate_limit_mode(settings: Settings, limiter: RateLimiter) -> str:
    if not settings.rate_limit_enabled:
        return "off"
    return "redis" if limiter.uses_redis else "memory"


def _chain_stop_signals(stack: AsyncExitStack, loop: asyncio.AbstractEventLoop) -> None:
    """Run ``end_all_waits`` on SIGINT and SIGTERM, then the handler installed before.

    The lifespan starts after uvicorn installed its handlers, so those are the
    ones chained; they are put back when the lifespan ends. Signal handlers can
    only be set in the main thread, so elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for number in STOP_SIGNALS:
        previous = signal.getsignal(number)
        if not callable(previous):
            continue
        signal.signal(number, functools.partial(_on_stop_signal, loop, previous))
        stack.callback(signal.signal, number, previous)


def _on_stop_signal(
    loop: asyncio.AbstractEventLoop,
    previous: Callable[[int, FrameType | None], Any],
    number: int,
    frame: FrameType | None,
) -> None:
    loop.call_soon_threadsafe(end_all_waits)
    previous(number, frame)


async def _warn_if_redis_unreachable(limiter: RateLimiter) -> None:
    """Log a warning when Redis does not respond at startup; the server starts anyway.

    While Redis is unreachable, requests pass without rate limits and /ready
    returns 503, so a load balancer that checks readiness sends no traffic here.
    """
    try:
        await asyncio.wait_for(limiter.check_storage(), timeout=REDIS_STARTUP_CHECK_SECONDS)
    except Exception as error:
        # Whatever the failure, the check only warns: the server starts without Redis.
        log.warning(
            "redis is unreachable, so rate limits are not enforced until it responds",
            error_type=type(error).__name__,
            hint="check REDIS_URL and that Redis runs; /ready returns 503 meanwhile",
        )
