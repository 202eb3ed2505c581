"""Queries on API keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from secapi.core.db.models import ApiKey


async def get_key_by_prefix(session: AsyncSession, prefix: str) -> ApiKey | None:
    """Return the key with this public prefix, its user loaded, revoked or not."""
    result = await session.execute(
        select(ApiKey).options(joinedload(ApiKey.user)).where(ApiKey.prefix == prefix)
    )
    return result.scalar_one_or_none()


async def get_user_key(session: AsyncSession, *, user_id: str, key_id: str) -> ApiKey | None:
    result = await session.execute(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user_id)
    )
    return result.scalar_one_or_none()


async def list_user_keys(session: AsyncSession, *, user_id: str) -> list[ApiKey]:
    """Return the user's keys, revoked ones included, oldest first."""
    result = await session.execute(
        select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at, ApiKey.id)
    )
    return list(result.scalars())


async def count_active_keys(session: AsyncSession, *, user_id: str) -> int:
    result = await session.execute(
        select(func.count())
        .select_from(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
    )
    return int(result.scalar_one())


async def add_key(
    session: AsyncSession, *, user_id: str, prefix: str, key_hash: str, name: str
) -> ApiKey:
    key = ApiKey(user_id=user_id, prefix=prefix, key_hash=key_hash, name=name)
    session.add(key)
    await session.flush()
    return key


async def touch_key(session: AsyncSession, *, key_id: str, used_at: datetime) -> None:
    """Set the key's last use time, without loading the row."""
    await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=used_at))
