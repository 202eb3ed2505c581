"""Domain errors shared by every layer of SecAPI.

The core raises these and never an HTTP or Kopf error: each boundary converts
them once (``secapi.api.errors`` to HTTP responses, the operator to Kopf's
permanent or temporary errors). ``message`` is always safe to show a user: it
names the bad value and what to do, and never carries a key or a password.
"""

from __future__ import annotations


class SecapiError(Exception):
    """Base of every domain error; ``code`` is a stable machine-readable name."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidInputError(SecapiError):
    """A value given by the caller is wrong; ``field`` names where it came from."""

    code = "invalid_input"

    def __init__(
        self,
        message: str,
        *,
        field: str,
        value: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.field = field
        self.value = value


class NotFoundError(SecapiError):
    """The resource does not exist, or belongs to someone else; callers cannot tell which."""

    code = "not_found"


class ConflictError(SecapiError):
    """The request clashes with the current state, such as an email already in use."""

    code = "conflict"


class AuthenticationError(SecapiError):
    """The caller could not be identified: no key, an unknown key or a revoked one."""

    code = "unauthenticated"


class PermissionDeniedError(SecapiError):
    """The caller is known but may not do this."""

    code = "permission_denied"


class RateLimitExceededError(SecapiError):
    """A rate limit was reached; the fields fill the X-RateLimit-* and Retry-After headers."""

    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        limit: int,
        remaining: int = 0,
        reset_at: int,
        retry_after: int,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.limit = limit
        self.remaining = remaining
        self.reset_at = reset_at
        self.retry_after = retry_after


class QuotaExceededError(RateLimitExceededError):
    """The user already has as many scans pending or running as the tier allows."""

    code = "quota_exceeded"


class ServiceUnavailableError(SecapiError):
    """A dependency (the executor, the database, Redis) cannot be reached right now."""

    code = "service_unavailable"
