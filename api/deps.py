"""Request dependencies: the app's shared parts, a database session, and the caller.

Authentication runs on every endpoint under /api/v1 except registration: it
checks the client address's failed-authentication budget, looks the key up,
audits a failure, then counts the request against the user's tier limit.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from secapi.core.audit import (
    ANONYMOUS,
    Actor,
    AuditAction,
    AuditOutcome,
    AuditRecord,
    client_address,
    record_event,
)
from secapi.core.auth import AuthService, KeyRejectedError, Principal
from secapi.core.executors.base import Executor
from secapi.core.ratelimit import LimitReachedError, LimitStatus, RateLimiter
from secapi.core.scans.documents import DocumentCache
from secapi.core.settings import Settings, Tier

api_key_header = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    description="An API key from POST /api/v1/auth/register or POST /api/v1/auth/keys.",
    auto_error=False,
)


@dataclass
class AppParts:
    """Objects that the lifespan creates once and every request shares."""

    settings: Settings
    session_factory: async_sessionmaker[AsyncSession]
    executor: Executor
    limiter: RateLimiter
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    documents: DocumentCache


@dataclass(frozen=True)
class Caller:
    """An authenticated request: the user and key, and the actor for audit events."""

    principal: Principal
    actor: Actor

    @property
    def tier(self) -> Tier:
        return Tier(self.principal.user.tier)


async def get_parts(request: Request) -> AppParts:
    parts: AppParts = request.app.state.parts
    return parts


Parts = Annotated[AppParts, Depends(get_parts)]


async def get_session(parts: Parts) -> AsyncIterator[AsyncSession]:
    async with parts.session_factory() as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]


def source_address(request: Request, parts: AppParts) -> str | None:
    peer = request.client.host if request.client else None
    return client_address(
        peer=peer,
        forwarded_for=request.headers.get("x-forwarded-for"),
        trusted_proxies=parts.trusted_proxies,
    )


def remember_rate_limit(request: Request, status: LimitStatus | None) -> None:
    """Keep the limit's state for the X-RateLimit-* headers of the response."""
    if status is not None:
        request.state.rate_limit = status


async def get_caller(
    request: Request,
    parts: Parts,
    session: Session,
    api_key: Annotated[str | None, Security(api_key_header)] = None,
) -> Caller:
    address = source_address(request, parts)
    anonymous = Actor(user_id=None, name=ANONYMOUS, source_ip=address)

    try:
        await parts.limiter.check_failed_authentications(address=address)
    except LimitReachedError as error:
        if error.first_in_window:
            await record_rate_limit(session, request, anonymous, error)
        raise

    try:
        principal = await AuthService(session, parts.settings).authenticate(api_key)
    except KeyRejectedError as error:
        await parts.limiter.count_failed_authentication(address=address)
        details = {"reason": error.problem, "method": request.method, "path": request.url.path}
        if error.prefix is not None:
            details["key_prefix"] = error.prefix
        await record_event(
            session,
            actor=anonymous,
            user_id=error.owner_id,
            record=AuditRecord(
                AuditAction.AUTHENTICATION_FAIL, AuditOutcome.DENIED, details=details
            ),
        )
        raise

    user = principal.user
    caller = Caller(
        principal=principal, actor=Actor(user_id=user.id, name=user.email, source_ip=address)
    )
    try:
        status = await parts.limiter.hit_request(user_id=user.id, tier=caller.tier)
    except LimitReachedError as error:
        if error.first_in_window:
            await record_rate_limit(session, request, caller.actor, error)
        raise
    remember_rate_limit(request, status)
    return caller


CurrentCaller = Annotated[Caller, Depends(get_caller)]


async def record_rate_limit(
    session: AsyncSession, request: Request, actor: Actor, error: LimitReachedError
) -> None:
    await record_event(
        session,
        actor=actor,
        record=AuditRecord(
            AuditAction.RATE_LIMIT_EXCEED,
            AuditOutcome.DENIED,
            details={
                "limit": error.scope.value,
                "amount": error.limit,
                "method": request.method,
                "path": request.url.path,
            },
        ),
    )
