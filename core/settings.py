"""Service settings, read once from the environment.

The variable names the original docker-compose SecAPI documented
(``DATABASE_URL``, ``REDIS_URL``, ``SECRET_KEY``, ``ENVIRONMENT``,
``RATE_LIMIT_ENABLED``, ``CELERY_BROKER_URL``) keep their names so existing
deployments keep working. Everything new is prefixed ``SECAPI_``, with ``__``
between a group and its field, e.g. ``SECAPI_SCANNER__MAX_CONCURRENT_SCANS``.
"""

from __future__ import annotations

import secrets
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# Values that people copy from examples; a production service must not run with them.
PLACEHOLDER_SECRETS = frozenset(
    {
        "",
        "changeme",
        "change-me",
        "secret",
        "your-secret-key",
        "your-secret-key-here",
        "dev",
        "development",
        "test",
    }
)
MIN_SECRET_KEY_LENGTH = 32


class Tier(StrEnum):
    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"


class TierLimits(BaseModel):
    """Limits of one tier. Zero in a count means no limit."""

    requests_per_minute: int = Field(ge=0, description="API requests per user per minute.")
    scans_per_hour: int = Field(ge=0, description="Scan submissions per user per hour.")
    concurrent_scans: int = Field(
        ge=0, description="Scans of one user that may be pending or running at once."
    )
    queue_priority: int = Field(
        ge=0, le=1000, description="Higher runs first when scans wait in the queue."
    )


class TierSettings(BaseModel):
    free: TierLimits = TierLimits(
        requests_per_minute=60, scans_per_hour=30, concurrent_scans=3, queue_priority=0
    )
    pro: TierLimits = TierLimits(
        requests_per_minute=600, scans_per_hour=300, concurrent_scans=10, queue_priority=10
    )
    enterprise: TierLimits = TierLimits(
        requests_per_minute=3000, scans_per_hour=3000, concurrent_scans=50, queue_priority=20
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_partial_tiers(cls, data: Any) -> Any:
        # SECAPI_TIERS__FREE__REQUESTS_PER_MINUTE alone sets one field; the tier's other
        # fields keep their defaults instead of failing as missing.
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is not None and isinstance(value, dict):
                default = field.default
                if isinstance(default, TierLimits):
                    filled[name] = {**default.model_dump(), **value}
        return filled

    def for_tier(self, tier: Tier) -> TierLimits:
        limits: TierLimits = getattr(self, tier.value)
        return limits


class RateLimitSettings(BaseModel):
    """Limits per client address, for requests that no user can be charged with. Zero means none."""

    registrations_per_hour: int = Field(
        10, ge=0, description="Account registrations per client address per hour."
    )
    failed_authentications_per_minute: int = Field(
        30,
        ge=0,
        description="Requests with a missing, unknown or revoked API key per client address "
        "per minute; past it, that address gets 429 until the minute ends.",
    )


MIN_GO_GC_PERCENT = 10
MAX_GO_GC_PERCENT = 100000
MIN_GO_MEMORY_LIMIT_BYTES = 64 * 1024 * 1024


def _whole_number(value: object, *, expected: str) -> int | None:
    """Return ``value`` as an int, None for None; raise ValueError naming what is ``expected``."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    text = str(value).strip()
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number: give {expected}")
    return int(text)


class ScannerSettings(BaseModel):
    """Trivy settings shared by both executors."""

    trivy_bin: str = Field("trivy", description="Trivy executable, a path or a name on PATH.")
    max_concurrent_scans: int = Field(
        2, ge=1, le=256, description="Trivy processes (local) or Jobs (Kubernetes) at once."
    )
    timeout_seconds: int = Field(
        600, ge=10, le=86400, description="Default time limit of one scan, in seconds."
    )
    max_timeout_seconds: int = Field(
        3600, ge=10, le=86400, description="Largest time limit a request may ask for, in seconds."
    )
    queue_timeout_seconds: int = Field(
        3600,
        ge=10,
        description="Seconds a scan may wait in the queue before it fails with reason QueueTimeout.",
    )
    cache_dir: Path | None = Field(
        None,
        description="Trivy cache folder holding the vulnerability DB (db/); "
        "unset means Trivy's default (~/.cache/trivy).",
    )
    db_repository: str | None = Field(
        None, description="OCI repository of the vulnerability DB (a mirror for air-gapped sites)."
    )
    java_db_repository: str | None = Field(None, description="OCI repository of the Java DB.")
    offline: bool = Field(
        False, description="Never download the DB; scans fail with DatabaseUnavailable if missing."
    )
    insecure_registries: bool = Field(
        False, description="Allow registries over plain HTTP or with self-signed certificates."
    )
    server_url: str | None = Field(
        None, description="Trivy server URL for client/server mode; unset means standalone."
    )
    max_report_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="Largest Trivy JSON report accepted, in bytes."
    )
    go_gc_percent: int | None = Field(
        400,
        description="GOGC of Trivy processes, from 10 to 100000: the heap grows by this percent "
        "of the live heap between garbage collections. 100 is Go's default.",
    )
    go_memory_limit_bytes: int | None = Field(
        None,
        description="GOMEMLIMIT of each Trivy process, in bytes, at least 64 MiB: the garbage "
        "collector runs more often as the process nears it. Unset means, for local scans, the "
        "memory of the machine or its cgroup divided by twice max_concurrent_scans; for scan "
        "Jobs, 90 % of the container's memory limit.",
    )

    @field_validator("go_gc_percent", mode="before")
    @classmethod
    def _check_go_gc_percent(cls, value: object) -> object:
        number = _whole_number(
            value,
            expected=f"a percent from {MIN_GO_GC_PERCENT} to {MAX_GO_GC_PERCENT}, with no "
            "unit (100 is Go's default; Go's GOGC=off is not supported)",
        )
        if number is not None and not MIN_GO_GC_PERCENT <= number <= MAX_GO_GC_PERCENT:
            raise ValueError(
                f"{number} is out of range: give a percent from {MIN_GO_GC_PERCENT} to "
                f"{MAX_GO_GC_PERCENT}; 100 is Go's default"
            )
        return value if number is None else number

    @field_validator("go_memory_limit_bytes", mode="before")
    @classmethod
    def _check_go_memory_limit(cls, value: object) -> object:
        number = _whole_number(
            value,
            expected=f"a number of bytes with no unit, at least {MIN_GO_MEMORY_LIMIT_BYTES} "
            "(64 MiB), such as 2147483648 for 2 GiB",
        )
        if number is not None and number < MIN_GO_MEMORY_LIMIT_BYTES:
            raise ValueError(
                f"{number} bytes is less than the minimum of {MIN_GO_MEMORY_LIMIT_BYTES} "
                "(64 MiB): give a number of bytes, such as 2147483648 for 2 GiB, or leave it "
                "unset for the default"
            )
        return value if number is None else number


class KubernetesSettings(BaseModel):
    """The Kubernetes executor and the operator."""

    scanner_image: str = Field(
        "ghcr.io/aquasecurity/trivy:0.74.0",
        description="Image of the scan Job's container; it must contain trivy and a POSIX shell.",
    )
    scanner_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account_name: str | None = Field(None, description="ServiceAccount of scan pods.")
    cpu_request: str = "100m"
    cpu_limit: str = "1"
    memory_request: str = "256Mi"
    memory_limit: str = "2Gi"
    cache_size_limit: str = Field("4Gi", description="Size limit of the scan pod's cache emptyDir.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, object]] = Field(default_factory=list)
    priority_class_name: str | None = None
    job_ttl_seconds: int = Field(
        86400,
        ge=60,
        description="Fallback TTL of finished Jobs, in seconds; the operator deletes them sooner.",
    )
    pending_timeout_seconds: int = Field(
        600, ge=10, description="Seconds a scan pod may stay unscheduled or not started."
    )
    max_log_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest encoded report read from a pod log, in bytes.",
    )
    image_pull_grace_seconds: int = Field(
        120,
        ge=0,
        description="Seconds a scan pod may fail to pull the scanner image before the scan "
        "fails with reason ScannerImagePullFailed.",
    )
    resync_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds between the operator's full passes over all Scans and Jobs, "
        "which enforce deadlines; watch events trigger passes sooner.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SECAPI_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    environment: Literal["development", "production"] = Field(
        "development", validation_alias=AliasChoices("ENVIRONMENT", "SECAPI_ENVIRONMENT")
    )
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "SECAPI_DATABASE_URL"),
        description="PostgreSQL URL; unset means an SQLite file in the data folder.",
    )
    redis_url: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "SECAPI_REDIS_URL"),
        description="Redis URL for rate limits; unset means in-memory limits.",
    )
    secret_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("SECRET_KEY", "SECAPI_SECRET_KEY"),
        description="Key of the HMAC that protects stored API keys; required in production.",
    )
    rate_limit_enabled: bool = Field(
        True, validation_alias=AliasChoices("RATE_LIMIT_ENABLED", "SECAPI_RATE_LIMIT_ENABLED")
    )
    celery_broker_url: str | None = Field(
        None,
        validation_alias=AliasChoices("CELERY_BROKER_URL"),
        description="Accepted for compatibility and ignored: Kubernetes or the database queues scans.",
    )
    executor: Literal["local", "kubernetes"] = Field(
        "local", description="Where scans run: local Trivy processes or Kubernetes Jobs."
    )
    namespace: str = Field("secapi", description="Namespace where the API creates Scan resources.")
    data_dir: Path = Field(
        Path.home() / ".local" / "share" / "secapi",
        description="Folder for the SQLite database and the generated development secret key.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Proxy addresses whose X-Forwarded-For is believed for audit source addresses.",
    )
    results_cache_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Memory each API process may use to keep recently read results documents "
        "uncompressed; 0 turns the cache off.",
    )
    registration_open: bool = Field(
        True, description="Allow anyone who reaches the API to register an account."
    )
    scanner: ScannerSettings = ScannerSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    tiers: TierSettings = TierSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if not value:
            return value
        # The messages repeat no part of the URL: it may hold the password.
        try:
            _ = make_url(value).port  # raises ValueError for a port that is not a number
        except ArgumentError:
            raise ValueError(
                "it is not a database URL; the form is "
                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:///PATH"
            ) from None
        except ValueError:
            raise ValueError(
                "its port is not a number, or its password has a character that must be "
                "percent-encoded (/ ? # @); the form is "
                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
            ) from None
        return value

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        if self.environment != "production":
            return self
        key = self.secret_key.get_secret_value() if self.secret_key else ""
        if key.strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                "SECRET_KEY is missing or a placeholder, and ENVIRONMENT=production requires "
                "a real one: set SECRET_KEY to a random value of at least "
                f"{MIN_SECRET_KEY_LENGTH} characters, e.g. from `openssl rand -hex 32`"
            )
        if len(key) < MIN_SECRET_KEY_LENGTH:
            raise ValueError(
                f"SECRET_KEY is shorter than {MIN_SECRET_KEY_LENGTH} characters, which "
                "ENVIRONMENT=production does not accept: generate one with `openssl rand -hex 32`"
            )
        return self

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    def sqlalchemy_url(self) -> str:
        """Return the async SQLAlchemy URL for DATABASE_URL, or the SQLite file."""
        if not self.database_url:
            return f"sqlite+aiosqlite:///{self.data_dir / 'secapi.db'}"
        url = self.database_url
        for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        if url.startswith("sqlite:///"):
            return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
        return url

    def resolved_secret_key(self) -> bytes:
        """Return the HMAC key for API keys.

        In development without SECRET_KEY, a random key is generated once and
        kept in the data folder, so keys stay valid across restarts.
        """
        if self.secret_key is not None and self.secret_key.get_secret_value():
            return self.secret_key.get_secret_value().encode()
        key_file = self.data_dir / "secret_key"
        if not key_file.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            key_file.touch(mode=0o600)
            key_file.write_text(secrets.token_hex(32))
        return key_file.read_text().strip().encode()

    def warn_about_ignored(self) -> list[str]:
        """Return warnings about settings that are accepted but have no effect."""
        notes = []
        if self.celery_broker_url:
            notes.append(
                "CELERY_BROKER_URL is set but ignored: scans are queued in the database "
                "(local executor) or as Scan resources (kubernetes executor)"
            )
        return notes


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first use."""
    return Settings()
