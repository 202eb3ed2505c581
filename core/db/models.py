"""SQLAlchemy models: users, API keys, scans, findings, reports and the audit trail.

Timestamps are timezone-aware UTC. Constraint names follow one convention so
Alembic migrations name them the same way on PostgreSQL and SQLite.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from secapi.core.settings import Tier

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware.

    SQLite keeps no time zone, so values read from it are naive; this type
    makes both databases return aware datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


# BigInteger primary keys do not autoincrement on SQLite; Integer does.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON}


class ScanStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (ScanStatus.COMPLETED, ScanStatus.FAILED)


class PrincipalKind(StrEnum):
    USER = "user"
    # Scans applied with kubectl (GitOps) belong to a cluster principal.
    CLUSTER = "cluster"


class FindingKind(StrEnum):
    VULNERABILITY = "vulnerability"
    SECRET = "secret"  # noqa: S105 - a finding kind, not a password
    MISCONFIGURATION = "misconfiguration"
    LICENSE = "license"


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default=PrincipalKind.USER.value)
    tier: Mapped[str] = mapped_column(String(16), default=Tier.FREE.value)
    is_admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="user")


class ApiKey(Base):
    """An API key. Only its public prefix and an HMAC-SHA256 of the whole key are stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100), default="default")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    user: Mapped[User] = relationship(back_populates="api_keys")


class Scan(Base):
    __tablename__ = "scans"
    __table_args__ = (
        # The local executor's queue: pending scans by priority, then age.
        Index("ix_scans_status_priority_created", "status", "priority", "created_at"),
        Index("ix_scans_user_created", "user_id", "created_at"),
        Index("ix_scans_k8s", "k8s_namespace", "k8s_name"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    image: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16), default=ScanStatus.PENDING.value)
    # A stable machine-readable reason for failures (ImageNotFound, Timeout, ...).
    reason: Mapped[str | None] = mapped_column(String(64), default=None)
    message: Mapped[str | None] = mapped_column(Text, default=None)
    executor: Mapped[str] = mapped_column(String(16), default="local")
    # Scan options as submitted: scanners, severities, ignore_unfixed, timeout, platform.
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    priority: Mapped[int] = mapped_column(default=0)
    attempts: Mapped[int] = mapped_column(default=0)
    # Identifies the process that claimed a local scan, so a restart can find orphans.
    worker_id: Mapped[str | None] = mapped_column(String(64), default=None)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)

    image_digest: Mapped[str | None] = mapped_column(String(128), default=None)
    os_family: Mapped[str | None] = mapped_column(String(64), default=None)
    os_name: Mapped[str | None] = mapped_column(String(64), default=None)
    # Whether the OS release is past its end of service life. None when no OS was detected,
    # and for scans stored before SecAPI recorded it.
    os_eosl: Mapped[bool | None] = mapped_column(default=None)
    trivy_version: Mapped[str | None] = mapped_column(String(32), default=None)
    db_updated_at: Mapped[datetime | None] = mapped_column(default=None)

    critical: Mapped[int] = mapped_column(default=0)
    high: Mapped[int] = mapped_column(default=0)
    medium: Mapped[int] = mapped_column(default=0)
    low: Mapped[int] = mapped_column(default=0)
    unknown: Mapped[int] = mapped_column(default=0)
    secrets: Mapped[int] = mapped_column(default=0)
    misconfigurations: Mapped[int] = mapped_column(default=0)
    licenses: Mapped[int] = mapped_column(default=0)

    # Set for scans that run as Kubernetes Scan resources.
    k8s_namespace: Mapped[str | None] = mapped_column(String(63), default=None)
    k8s_name: Mapped[str | None] = mapped_column(String(253), default=None)
    k8s_uid: Mapped[str | None] = mapped_column(String(36), default=None)
    k8s_generation: Mapped[int | None] = mapped_column(BigInteger, default=None)


class Finding(Base):
    """One vulnerability, secret, misconfiguration or license of a completed scan."""

    __tablename__ = "findings"
    __table_args__ = (Index("ix_findings_scan_kind_severity", "scan_id", "kind", "severity"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    scan_id: Mapped[str] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    # Position in the report, so pages come back in report order.
    ordinal: Mapped[int] = mapped_column()
    severity: Mapped[str] = mapped_column(String(10))
    # CVE/GHSA id for a vulnerability, rule id for a secret, check id for a misconfiguration,
    # license name (cut to fit; `title` contains it whole) for a license.
    identifier: Mapped[str] = mapped_column(String(128))
    target: Mapped[str] = mapped_column(Text)
    target_class: Mapped[str | None] = mapped_column(String(32), default=None)
    package_type: Mapped[str | None] = mapped_column(String(32), default=None)
    package_name: Mapped[str | None] = mapped_column(Text, default=None)
    installed_version: Mapped[str | None] = mapped_column(Text, default=None)
    fixed_version: Mapped[str | None] = mapped_column(Text, default=None)
    title: Mapped[str | None] = mapped_column(Text, default=None)
    primary_url: Mapped[str | None] = mapped_column(Text, default=None)
    # Fields that only some kinds have (secret line numbers, misconfiguration resolution, ...).
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ScanReport(Base):
    """The results document of a completed scan, gzip-compressed JSON, served as stored."""

    __tablename__ = "scan_reports"

    scan_id: Mapped[str] = mapped_column(
        ForeignKey("scans.id", ondelete="CASCADE"), primary_key=True
    )
    results_gzip: Mapped[bytes] = mapped_column(LargeBinary)
    report_sha256: Mapped[str] = mapped_column(String(64))
    report_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """One entry of the append-only audit trail; the database rejects updates and deletes."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_user_occurred", "user_id", "occurred_at"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
    # No foreign key: the trail outlives the rows it talks about.
    user_id: Mapped[str | None] = mapped_column(String(36), default=None)
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str | None] = mapped_column(String(32), default=None)
    resource_id: Mapped[str | None] = mapped_column(String(253), default=None)
    outcome: Mapped[str] = mapped_column(String(16))
    source_ip: Mapped[str | None] = mapped_column(String(64), default=None)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
