"""Accounts and API keys: registration, key generation, hashing, lookup and revocation.

A key reads ``sk_<prefix>_<secret>``. The prefix (10 lowercase letters and
digits) is public: it finds the row and appears in listings and the audit
trail. The secret is 32 random bytes, URL-safe base64. Only the prefix and an
HMAC-SHA256 of the whole key, keyed with SECRET_KEY, are stored, so a leaked
database does not yield usable keys, and the comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass
from datetime import timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from secapi.core.audit import Actor, AuditAction, AuditOutcome, AuditRecord, add_event
from secapi.core.db import keys as key_repository
from secapi.core.db import users as user_repository
from secapi.core.db.models import ApiKey, User, utcnow
from secapi.core.errors import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from secapi.core.settings import Settings, Tier

log = structlog.get_logger(__name__)

KEY_SCHEME = "sk"
PREFIX_LENGTH = 10
SECRET_BYTES = 32
MAX_ACTIVE_KEYS = 20
MAX_EMAIL_LENGTH = 320
# Writing last_used_at on every request would turn each read into a write.
LAST_USED_PRECISION = timedelta(minutes=1)

_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
# token_urlsafe(32) gives 43 characters; longer secrets are accepted, shorter ones are not keys.
_KEY_PATTERN = re.compile(r"sk_([a-z0-9]{10})_([A-Za-z0-9_-]{43,128})")
# Deliberately loose: one @, a dot in the domain, no spaces and no control characters.
EMAIL_PATTERN = r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$"
_EMAIL_PATTERN = re.compile(EMAIL_PATTERN)


class KeyProblem:
    """Reasons for a failed authentication, as recorded in the audit trail."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"


class KeyRejectedError(AuthenticationError):
    """A key did not authenticate; ``owner_id`` is set when the prefix matched a user's key."""

    def __init__(self, *, problem: str, prefix: str | None, owner_id: str | None) -> None:
        super().__init__(
            "a valid API key is required in the X-API-Key header; "
            "register at POST /api/v1/auth/register to get one"
            if problem == KeyProblem.MISSING
            else "the API key is invalid or revoked; use an active key, "
            "or create one with POST /api/v1/auth/keys using another active key"
        )
        self.problem = problem
        self.prefix = prefix
        self.owner_id = owner_id


@dataclass(frozen=True)
class IssuedKey:
    """A newly created key; ``key`` is its only plaintext copy and is shown once."""

    key: str
    record: ApiKey


@dataclass(frozen=True)
class Principal:
    """An authenticated caller and the key it used."""

    user: User
    key: ApiKey


def generate_api_key() -> tuple[str, str]:
    """Return a new key and its public prefix."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    return f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}", prefix


def key_prefix(key: str) -> str | None:
    """Return the public prefix of a well-formed key, or None for anything else."""
    match = _KEY_PATTERN.fullmatch(key)
    return match.group(1) if match else None


def hash_api_key(key: str, *, secret: bytes) -> str:
    """Return the hex HMAC-SHA256 of the whole key, the only form that is stored."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def is_email_address(text: str) -> bool:
    """Tell whether the text has the form of an email address and fits the users table."""
    return len(text) <= MAX_EMAIL_LENGTH and _EMAIL_PATTERN.match(text) is not None


def invalid_email_message(text: str) -> str:
    """Return the message for a rejected email address, which quotes at most 100 characters."""
    return f"invalid email address: {text[:100]!r}; give one like name@example.com"


def normalize_email(email: str) -> str:
    """Return the address trimmed and lower-cased, raising InvalidInputError if it is not one."""
    normalized = email.strip().lower()
    if not is_email_address(normalized):
        raise InvalidInputError(invalid_email_message(email), field="email", value=email[:100])
    return normalized


class AuthService:
    """Accounts and keys. Each method that changes data owns its unit of work and commits."""

    def __init__(self, session: AsyncSession, settings: Settings) -> None:
        self._session = session
        self._settings = settings

    async def register(
        self, *, email: str, source_ip: str | None, tier: Tier = Tier.FREE
    ) -> tuple[User, IssuedKey]:
        """Create a user with a first key, and record it in the audit trail; commits.

        Raises InvalidInputError for a malformed address, ConflictError when
        it is taken.
        """
        address = normalize_email(email)
        user = await user_repository.add_user(self._session, email=address, tier=tier)
        issued = await self._issue_key(user=user, name="default")

        actor = Actor(user_id=user.id, name=user.email, source_ip=source_ip)
        await add_event(
            self._session,
            actor=actor,
            record=AuditRecord(
                AuditAction.USER_REGISTER,
                AuditOutcome.SUCCESS,
                resource_type="user",
                resource_id=user.id,
                details={"tier": user.tier, "key_prefix": issued.record.prefix},
            ),
        )
        await self._session.commit()
        log.info("user registered", user_id=user.id, key_prefix=issued.record.prefix)
        return user, issued

    async def authenticate(self, key: str | None) -> Principal:
        """Return the user and key for an X-API-Key value.

        Raises KeyRejectedError. Its ``problem`` names the reason for the audit
        trail, while its message stays the same for every invalid key, so
        callers learn only that the key did not work.
        """
        if not key:
            raise KeyRejectedError(problem=KeyProblem.MISSING, prefix=None, owner_id=None)
        prefix = key_prefix(key)
        if prefix is None:
            raise KeyRejectedError(problem=KeyProblem.MALFORMED, prefix=None, owner_id=None)

        record = await key_repository.get_key_by_prefix(self._session, prefix)
        expected = hash_api_key(key, secret=self._settings.resolved_secret_key())
        # Compare even when no row matched, so a miss takes as long as a wrong secret.
        stored = record.key_hash if record is not None else "0" * len(expected)
        if not hmac.compare_digest(stored, expected) or record is None:
            owner = record.user_id if record is not None else None
            raise KeyRejectedError(problem=KeyProblem.UNKNOWN, prefix=prefix, owner_id=owner)
        if record.revoked_at is not None:
            raise KeyRejectedError(
                problem=KeyProblem.REVOKED, prefix=prefix, owner_id=record.user_id
            )

        now = utcnow()
        if record.last_used_at is None or now - record.last_used_at > LAST_USED_PRECISION:
            await key_repository.touch_key(self._session, key_id=record.id, used_at=now)
            record.last_used_at = now
            await self._session.commit()
        return Principal(user=record.user, key=record)

    async def create_key(self, *, principal: Principal, name: str, actor: Actor) -> IssuedKey:
        """Create another key for the caller's user, and audit it; commits.

        Raises ConflictError when the user already has the maximum of active keys.
        """
        user = principal.user
        active = await key_repository.count_active_keys(self._session, user_id=user.id)
        if active >= MAX_ACTIVE_KEYS:
            raise ConflictError(
                f"you already have {active} active API keys, the maximum; "
                "revoke one with DELETE /api/v1/auth/keys/{key_id} first",
                code="too_many_keys",
            )

        issued = await self._issue_key(user=user, name=name)
        await add_event(
            self._session,
            actor=actor,
            record=AuditRecord(
                AuditAction.KEY_CREATE,
                AuditOutcome.SUCCESS,
                resource_type="api_key",
                resource_id=issued.record.id,
                details={"key_prefix": issued.record.prefix, "name": name},
            ),
        )
        await self._session.commit()
        log.info("api key created", user_id=user.id, key_prefix=issued.record.prefix)
        return issued

    async def list_keys(self, *, principal: Principal) -> list[ApiKey]:
        return await key_repository.list_user_keys(self._session, user_id=principal.user.id)

    async def revoke_key(self, *, principal: Principal, key_id: str, actor: Actor) -> ApiKey:
        """Revoke one of the caller's keys, and audit it; commits.

        Revoking a revoked key changes nothing. The last active key cannot be
        revoked (ConflictError), since a user without one could never sign in
        again: create a new key first, then revoke the old one.
        """
        record = await key_repository.get_user_key(
            self._session, user_id=principal.user.id, key_id=key_id
        )
        if record is None:
            raise NotFoundError(f"API key {key_id!r} was not found among your keys")
        if record.revoked_at is not None:
            return record

        active = await key_repository.count_active_keys(self._session, user_id=principal.user.id)
        if active <= 1:
            raise ConflictError(
                f"API key {record.prefix!r} is your last active key, and revoking it would "
                "lock you out; create a new key with POST /api/v1/auth/keys, then revoke this one",
                code="last_active_key",
            )

        record.revoked_at = utcnow()
        await add_event(
            self._session,
            actor=actor,
            record=AuditRecord(
                AuditAction.KEY_REVOKE,
                AuditOutcome.SUCCESS,
                resource_type="api_key",
                resource_id=record.id,
                details={"key_prefix": record.prefix},
            ),
        )
        await self._session.commit()
        log.info("api key revoked", user_id=principal.user.id, key_prefix=record.prefix)
        return record

    async def set_tier(self, *, email: str, tier: Tier, actor: Actor) -> User:
        """Set a user's tier, and audit it in that user's trail; commits."""
        user = await user_repository.get_user_by_email(self._session, normalize_email(email))
        if user is None:
            raise NotFoundError(f"no user has the email address {email!r}; check the spelling")
        previous = user.tier
        await user_repository.set_tier(self._session, user=user, tier=tier)
        await add_event(
            self._session,
            actor=actor,
            user_id=user.id,
            record=AuditRecord(
                AuditAction.USER_TIER_CHANGE,
                AuditOutcome.SUCCESS,
                resource_type="user",
                resource_id=user.id,
                details={"from": previous, "to": tier.value},
            ),
        )
        await self._session.commit()
        log.info("user tier changed", user_id=user.id, tier=tier.value, previous=previous)
        return user

    async def _issue_key(self, *, user: User, name: str) -> IssuedKey:
        key, prefix = generate_api_key()
        record = await key_repository.add_key(
            self._session,
            user_id=user.id,
            prefix=prefix,
            key_hash=hash_api_key(key, secret=self._settings.resolved_secret_key()),
            name=name,
        )
        return IssuedKey(key=key, record=record)


def check_registration_open(settings: Settings) -> None:
    """Raise PermissionDeniedError when self-service registration is turned off."""
    if not settings.registration_open:
        raise PermissionDeniedError(
            "registration is closed on this server; ask an administrator to create "
            "your account with `secapi admin create-user EMAIL`",
            code="registration_closed",
        )
