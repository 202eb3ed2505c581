"""Queries on users."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from secapi.core.db.models import PrincipalKind, User
from secapi.core.errors import ConflictError
from secapi.core.settings import Tier


async def get_user(session: AsyncSession, user_id: str) -> User | None:
    return await session.get(User, user_id)


async def get_user_by_email(session: AsyncSession, email: str) -> User | None:
    result = await session.execute(select(User).where(User.email == email))
    return result.scalar_one_or_none()


async def add_user(session: AsyncSession, *, email: str, tier: Tier) -> User:
    """Insert a user and flush, raising ConflictError when the email is taken.

    The unique constraint decides, so two concurrent registrations of one
    address cannot both succeed. After a conflict the session's transaction
    is unusable and the caller must roll it back.
    """
    user = User(email=email, tier=tier.value, kind=PrincipalKind.USER.value)
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as error:
        raise ConflictError(
            f"an account with the email address {email!r} already exists; "
            "use one of its API keys, or register another address",
            code="email_taken",
        ) from error
    return user


async def set_tier(session: AsyncSession, *, user: User, tier: Tier) -> None:
    user.tier = tier.value
    await session.flush()
