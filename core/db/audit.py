"""Queries on the audit trail, which is append-only: there is no update or delete here."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from secapi.core.db.models import AuditEvent


async def add_event(session: AsyncSession, event: AuditEvent) -> AuditEvent:
    session.add(event)
    await session.flush()
    return event


async def list_user_events(
    session: AsyncSession,
    *,
    user_id: str,
    offset: int,
    limit: int,
    actions: Sequence[str] | None = None,
) -> tuple[list[AuditEvent], int]:
    """Return one slice of the user's events, newest first, and the count of all of them.

    With ``actions``, only events of those actions are counted and returned.
    """
    conditions = [AuditEvent.user_id == user_id]
    if actions:
        conditions.append(AuditEvent.action.in_(actions))
    total = await session.execute(select(func.count()).select_from(AuditEvent).where(*conditions))
    rows = await session.execute(
        select(AuditEvent)
        .where(*conditions)
        .order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc())
        .offset(offset)
        .limit(limit)
    )
    return list(rows.scalars()), int(total.scalar_one())
