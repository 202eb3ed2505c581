"""Rate limits per user (by tier) and per client address, with the `limits` library.

Counters live in Redis when REDIS_URL is set, so every API process shares
them, and in this process's memory otherwise (each process then counts on its
own). Windows are fixed: a limit of N per minute allows N requests in each
clock-aligned minute since the counter's first hit, so up to 2N can pass
around a window boundary.

When the storage fails (Redis down), requests pass and a warning is logged.
API keys carry 256 random bits, so losing the failed-authentication limit for
a while does not make guessing practical. Rejecting every request instead
would turn a Redis outage into an API outage. /ready reports the failure.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

import structlog
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.errors import StorageError

from secapi.core.errors import RateLimitExceededError
from secapi.core.settings import Settings, Tier

log = structlog.get_logger(__name__)

KEY_PREFIX = "secapi"
REDIS_URL_FORM = "redis://[:PASSWORD@]HOST:PORT/DB"
# At most one "storage failed" warning per this many seconds, so an outage does not flood the log.
STORAGE_WARNING_INTERVAL = 60.0


class LimitScope(StrEnum):
    REQUESTS = "requests_per_minute"
    SCANS = "scans_per_hour"
    REGISTRATIONS = "registrations_per_hour"
    FAILED_AUTHENTICATIONS = "failed_authentications_per_minute"


@dataclass(frozen=True)
class LimitStatus:
    """State of one limit after a request, for the X-RateLimit-* headers."""

    limit: int
    remaining: int
    reset_time: float  # epoch seconds

    @property
    def reset_at(self) -> int:
        """The reset time in whole epoch seconds, rounded up, as X-RateLimit-Reset shows it."""
        return math.ceil(self.reset_time)


class LimitReachedError(RateLimitExceededError):
    """A rate limit was reached; ``first_in_window`` is True for the first refused request.

    Only that first refusal is audited, so a client that keeps hammering costs
    one audit row per window rather than one per request.
    """

    def __init__(self, *, scope: LimitScope, status: LimitStatus, first_in_window: bool) -> None:
        retry_after = max(1, math.ceil(status.reset_time - time.time()))
        super().__init__(
            f"rate limit of {status.limit} {_describe(scope)} reached; retry after {retry_after} s",
            limit=status.limit,
            remaining=0,
            reset_at=status.reset_at,
            retry_after=retry_after,
        )
        self.scope = scope
        self.first_in_window = first_in_window


class RateLimiter:
    """Checks and counts requests against the configured limits."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._enabled = settings.rate_limit_enabled
        self.storage = create_storage(settings)
        self._last_warning = 0.0

    @property
    def uses_redis(self) -> bool:
        return isinstance(self.storage, RedisStorage)

    async def check_storage(self) -> None:
        """Raise StorageError when the storage does not respond."""
        if not await self.storage.check():
            raise StorageError(ConnectionError("the rate limit storage did not respond to PING"))

    async def close(self) -> None:
        """Close the Redis connections, or stop the memory storage's expiry task."""
        if isinstance(self.storage, RedisStorage):
            # limits 5 keeps the redis-py client on the bridge and offers no close method.
            client = getattr(self.storage.bridge, "storage", None)
            if client is not None:
                await client.aclose()
        elif isinstance(self.storage, MemoryStorage) and self.storage.timer is not None:
            self.storage.timer.cancel()

    async def hit_request(self, *, user_id: str, tier: Tier) -> LimitStatus | None:
        """Count one API request of a user, raising LimitReachedError past the tier's limit."""
        amount = self._settings.tiers.for_tier(tier).requests_per_minute
        return await self._hit(LimitScope.REQUESTS, _per_minute(amount), user_id)

    async def check_scan_submission(self, *, user_id: str, tier: Tier) -> LimitStatus | None:
        """Raise LimitReachedError if the user has no scan submission left this hour.

        This only looks; ``count_scan_submission`` counts a submission once it
        was accepted, so invalid requests do not use up the quota.
        NOTE: two submissions racing for the last hourly slot can both pass.
        """
        amount = self._settings.tiers.for_tier(tier).scans_per_hour
        return await self._peek(LimitScope.SCANS, _per_hour(amount), user_id, count_refusals=False)

    async def count_scan_submission(self, *, user_id: str, tier: Tier) -> LimitStatus | None:
        amount = self._settings.tiers.for_tier(tier).scans_per_hour
        return await self._count(LimitScope.SCANS, _per_hour(amount), user_id)

    async def hit_registration(self, *, address: str | None) -> LimitStatus | None:
        amount = self._settings.rate_limits.registrations_per_hour
        return await self._hit(LimitScope.REGISTRATIONS, _per_hour(amount), address or "unknown")

    async def check_failed_authentications(self, *, address: str | None) -> None:
        """Raise LimitReachedError if the address had too many failed authentications.

        Checked before the key is looked up, so a client past the limit cannot
        tell a valid key from an invalid one until the window ends.
        """
        amount = self._settings.rate_limits.failed_authentications_per_minute
        await self._peek(
            LimitScope.FAILED_AUTHENTICATIONS,
            _per_minute(amount),
            address or "unknown",
            count_refusals=True,
        )

    async def count_failed_authentication(self, *, address: str | None) -> None:
        amount = self._settings.rate_limits.failed_authentications_per_minute
        await self._count(
            LimitScope.FAILED_AUTHENTICATIONS, _per_minute(amount), address or "unknown"
        )

    async def _hit(
        self, scope: LimitScope, item: RateLimitItem | None, identifier: str
    ) -> LimitStatus | None:
        status = await self._count(scope, item, identifier)
        if item is None or status is None:
            return None
        if status.remaining < 0:
            raise LimitReachedError(
                scope=scope,
                status=LimitStatus(status.limit, 0, status.reset_time),
                first_in_window=status.remaining == -1,
            )
        return status

    async def _count(
        self, scope: LimitScope, item: RateLimitItem | None, identifier: str
    ) -> LimitStatus | None:
        """Add one to the counter; ``remaining`` is negative once past the limit."""
        if not self._enabled or item is None:
            return None
        key = item.key_for(scope.value, identifier)
        try:
            count = await self.storage.incr(key, item.get_expiry())
            reset_at = await self.storage.get_expiry(key)
        except StorageError as error:
            self._warn(scope, error)
            return None
        return LimitStatus(item.amount, item.amount - count, reset_at)

    async def _peek(
        self,
        scope: LimitScope,
        item: RateLimitItem | None,
        identifier: str,
        *,
        count_refusals: bool,
    ) -> LimitStatus | None:
        """Raise LimitReachedError if the counter is at the limit, without counting this request.

        With ``count_refusals`` a refused request is counted after all, so the
        counter separates the first refusal of a window from later ones.
        Without it, every refusal is reported as the first.
        """
        if not self._enabled or item is None:
            return None
        key = item.key_for(scope.value, identifier)
        try:
            count = await self.storage.get(key)
            if count >= item.amount and count_refusals:
                count = await self.storage.incr(key, item.get_expiry())
            reset_at = await self.storage.get_expiry(key) if count else time.time()
        except StorageError as error:
            self._warn(scope, error)
            return None
        status = LimitStatus(item.amount, max(0, item.amount - count), reset_at)
        if count >= item.amount:
            first = count == item.amount + 1 if count_refusals else True
            raise LimitReachedError(scope=scope, status=status, first_in_window=first)
        return status

    def _warn(self, scope: LimitScope, error: StorageError) -> None:
        now = time.monotonic()
        if now - self._last_warning < STORAGE_WARNING_INTERVAL:
            return
        self._last_warning = now
        log.warning(
            "rate limit storage failed, so requests pass unlimited",
            scope=scope.value,
            error=str(error.storage_error),
        )


def create_storage(settings: Settings) -> Storage:
    """Return Redis storage for REDIS_URL through redis-py's asyncio client, or memory."""
    if settings.redis_url is None or not settings.redis_url.get_secret_value():
        return MemoryStorage()
    url = settings.redis_url.get_secret_value()
    if not url.startswith(("redis://", "rediss://", "redis+unix://")):
        raise ValueError(
            "REDIS_URL must start with redis://, rediss:// or redis+unix:// "
            f"(it starts with {url.split(':', 1)[0]!r})"
        )
    # The errors below never repeat the URL or its parts: they may hold the password.
    try:
        _ = urlsplit(url).port  # raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(
            f"REDIS_URL is invalid: its port is not a number, or its password has a character "
            f"that must be percent-encoded (/ ? # @); the form is {REDIS_URL_FORM}"
        ) from None
    try:
        return RedisStorage(
            f"async+{url}",
            implementation="redispy",
            wrap_exceptions=True,
            key_prefix=KEY_PREFIX,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
        )
    except Exception as error:
        # Any error of the library: its messages contain the whole URL.
        raise ValueError(
            f"REDIS_URL is invalid ({type(error).__name__}); the form is {REDIS_URL_FORM}"
        ) from None


def _per_minute(amount: int) -> RateLimitItem | None:
    return RateLimitItemPerMinute(amount, namespace=KEY_PREFIX) if amount > 0 else None


def _per_hour(amount: int) -> RateLimitItem | None:
    return RateLimitItemPerHour(amount, namespace=KEY_PREFIX) if amount > 0 else None


def _describe(scope: LimitScope) -> str:
    return {
        LimitScope.REQUESTS: "requests per minute",
        LimitScope.SCANS: "scan submissions per hour",
        LimitScope.REGISTRATIONS: "registrations per hour from this address",
        LimitScope.FAILED_AUTHENTICATIONS: "failed authentications per minute from this address",
    }[scope]
