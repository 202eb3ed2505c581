"""Recording and reading the audit trail.

Every event records who (user id and actor name), what (action), to which
resource, when, from which address, and with what outcome. The table is
append-only: database triggers reject UPDATE and DELETE. Details never carry
an API key, only its public prefix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from secapi.core.db import audit as audit_repository
from secapi.core.db.models import AuditEvent
from secapi.core.errors import (
    AuthenticationError,
    PermissionDeniedError,
    RateLimitExceededError,
    SecapiError,
)
from secapi.core.pagination import Page, page_offset

log = structlog.get_logger(__name__)

ANONYMOUS = "anonymous"


class AuditAction(StrEnum):
    USER_REGISTER = "user.register"
    USER_TIER_CHANGE = "user.tier_change"
    KEY_CREATE = "api_key.create"
    KEY_REVOKE = "api_key.revoke"
    AUTHENTICATION_FAIL = "auth.fail"
    RATE_LIMIT_EXCEED = "rate_limit.exceed"
    SCAN_SUBMIT = "scan.submit"
    SCAN_READ = "scan.read"
    SCAN_DELETE = "scan.delete"


class AuditOutcome(StrEnum):
    SUCCESS = "success"
    # Refused before the action ran: authentication, permission or a limit.
    DENIED = "denied"
    # The action ran and failed: invalid input, a missing resource, an unavailable service.
    FAILURE = "failure"


@dataclass(frozen=True)
class Actor:
    """The party acting: a user (by id and email), an admin command, or an anonymous client."""

    user_id: str | None
    name: str
    source_ip: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """The action and its outcome; ``details`` contains JSON values and never a secret."""

    action: AuditAction
    outcome: AuditOutcome
    resource_type: str | None = None
    resource_id: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


async def add_event(
    session: AsyncSession,
    *,
    actor: Actor,
    record: AuditRecord,
    user_id: str | None = None,
) -> AuditEvent:
    """Add an event to the session's transaction and flush it; the caller commits.

    ``user_id`` overrides whose trail the event lands in, for a failed use of
    a known key, which belongs to the key's owner although no one signed in.
    """
    event = AuditEvent(
        user_id=user_id if user_id is not None else actor.user_id,
        actor=actor.name,
        action=record.action.value,
        resource_type=record.resource_type,
        resource_id=record.resource_id,
        outcome=record.outcome.value,
        source_ip=actor.source_ip,
        details=dict(record.details),
    )
    return await audit_repository.add_event(session, event)


async def list_events(
    session: AsyncSession,
    *,
    user_id: str,
    page: int,
    page_size: int,
    actions: Sequence[AuditAction] | None = None,
) -> Page[AuditEvent]:
    """Return one page of the user's own events, newest first, of ``actions`` if given."""
    items, total = await audit_repository.list_user_events(
        session,
        user_id=user_id,
        offset=page_offset(page=page, page_size=page_size),
        limit=page_size,
        actions=[action.value for action in actions] if actions else None,
    )
    return Page(items=items, total=total, page=page, page_size=page_size)


def parse_networks(
    entries: Iterable[str],
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Parse trusted proxy entries, each an address or a CIDR network.

    Raises ValueError naming the entry that is neither.
    """
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as error:
            raise ValueError(
                f"trusted proxy {entry!r} is neither an IP address nor a CIDR network, "
                "e.g. 10.0.0.5 or 10.0.0.0/8"
            ) from error
    return networks


def client_address(
    *,
    peer: str | None,
    forwarded_for: str | None,
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str | None:
    """Return the address of the client behind any trusted proxies.

    X-Forwarded-For is believed only when the direct peer is a trusted proxy.
    The list is read from the right, because each proxy appends the address it
    saw. The first address that is not a trusted proxy is the client. A
    malformed entry ends the walk, and the last address believed is returned.
    """
    if peer is None or not forwarded_for or not _is_trusted(peer, trusted_proxies):
        return peer

    address = peer
    for hop in reversed([part.strip() for part in forwarded_for.split(",")]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address
        address = hop
        if not _is_trusted(hop, trusted_proxies):
            return address
    return address


def _is_trusted(
    address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in networks)


@dataclass
class AuditScope:
    """The resource an audited action is about, filled in as the action learns it."""

    resource_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Writes the success event; audit_action sets it.
    _write_success: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)
    _success_recorded: bool = False

    async def record_success_now(self) -> None:
        """Record the action's success event before the block ends, and not again at its end.

        For an action whose success is settled before a slow part, such as a
        read that then waits for the scan to end. An error later in the block
        is still recorded, as a second event.
        """
        if self._success_recorded or self._write_success is None:
            return
        self._success_recorded = True
        await self._write_success()


@asynccontextmanager
async def audit_action(
    session: AsyncSession,
    *,
    actor: Actor,
    action: AuditAction,
    resource_type: str | None,
    resource_id: str | None = None,
    record_success: bool = True,
) -> AsyncIterator[AuditScope]:
    """Record the action's outcome when the block ends; owns the audit event's commit.

    A SecapiError from the block is recorded as denied (authentication,
    permission, limits) or failed (anything else) and re-raised. The session's
    transaction is rolled back first, because the error may have left it
    unusable. Actions that record their own success event in the same
    transaction as their change pass ``record_success=False``. A failure to
    write the event is logged and does not change the request's response,
    because the action itself has already happened or failed.
    """
    scope = AuditScope(resource_id=resource_id)

    async def write_success() -> None:
        await _commit_event(
            session,
            actor=actor,
            record=AuditRecord(
                action,
                AuditOutcome.SUCCESS,
                resource_type=resource_type,
                resource_id=scope.resource_id,
                details=scope.details,
            ),
        )

    scope._write_success = write_success
    try:
        yield scope
    except SecapiError as error:
        await session.rollback()
        denied = isinstance(
            error, AuthenticationError | PermissionDeniedError | RateLimitExceededError
        )
        await _commit_event(
            session,
            actor=actor,
            record=AuditRecord(
                action,
                AuditOutcome.DENIED if denied else AuditOutcome.FAILURE,
                resource_type=resource_type,
                resource_id=scope.resource_id,
                details={**scope.details, "error": error.code},
            ),
        )
        raise
    if record_success and not scope._success_recorded:
        await write_success()


async def record_event(
    session: AsyncSession, *, actor: Actor, record: AuditRecord, user_id: str | None = None
) -> None:
    """Record one event in a transaction of its own, after rolling back any open one.

    For events about requests that fail, such as a failed authentication.
    Write errors are logged, not raised.
    """
    await session.rollback()
    await _commit_event(session, actor=actor, record=record, user_id=user_id)


async def _commit_event(
    session: AsyncSession, *, actor: Actor, record: AuditRecord, user_id: str | None = None
) -> None:
    try:
        await add_event(session, actor=actor, record=record, user_id=user_id)
        await session.commit()
    except SQLAlchemyError as error:
        await session.rollback()
        log.error(
            "audit event could not be written",
            action=record.action.value,
            outcome=record.outcome.value,
            user_id=user_id or actor.user_id,
            resource_id=record.resource_id,
            error_type=type(error).__name__,
        )
