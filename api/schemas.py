"""Request and response bodies of the REST API.

Field names follow the original SecAPI (``scan_id``, ``api_key``, ``status``),
so scripts written against it keep working.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from secapi.core.audit import AuditOutcome
from secapi.core.auth import EMAIL_PATTERN, invalid_email_message, is_email_address
from secapi.core.db.models import ApiKey, AuditEvent, Scan, ScanStatus, User
from secapi.core.scans.options import ScanOptions
from secapi.core.settings import Tier, TierLimits


class Severity(StrEnum):
    UNKNOWN = "UNKNOWN"
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


# Ids are UUIDs; anything outside this alphabet cannot be one and never reaches a query.
ID_PATTERN = r"^[A-Za-z0-9-]{1,64}$"


# --- accounts and keys -------------------------------------------------------


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The pattern is checked by the validator below, so that a mismatch gets a readable
    # message; the OpenAPI document still shows it.
    email: str = Field(
        max_length=320,
        json_schema_extra={"pattern": EMAIL_PATTERN},
        examples=["you@example.com"],
        description="Email address; it is stored lower-cased.",
    )

    @field_validator("email")
    @classmethod
    def _check_email(cls, value: str) -> str:
        if not is_email_address(value):
            raise ValueError(invalid_email_message(value))
        return value


class RegisterResponse(BaseModel):
    user_id: str
    email: str
    tier: Tier
    api_key: str = Field(description="The API key. It is shown only here, once: store it now.")
    key_prefix: str = Field(description="Public part of the key, shown in key listings.")


class LimitsResponse(BaseModel):
    requests_per_minute: int = Field(description="API requests per minute; 0 means no limit.")
    scans_per_hour: int = Field(description="Scan submissions per hour; 0 means no limit.")
    concurrent_scans: int = Field(
        description="Scans that may be pending or running at once; 0 means no limit."
    )

    @classmethod
    def of(cls, limits: TierLimits) -> LimitsResponse:
        return cls(
            requests_per_minute=limits.requests_per_minute,
            scans_per_hour=limits.scans_per_hour,
            concurrent_scans=limits.concurrent_scans,
        )


class UserResponse(BaseModel):
    user_id: str
    email: str
    tier: Tier
    created_at: datetime
    limits: LimitsResponse
    rate_limit_enabled: bool

    @classmethod
    def of(cls, user: User, *, limits: TierLimits, enabled: bool) -> UserResponse:
        return cls(
            user_id=user.id,
            email=user.email,
            tier=Tier(user.tier),
            created_at=user.created_at,
            limits=LimitsResponse.of(limits),
            rate_limit_enabled=enabled,
        )


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "default",
        min_length=1,
        max_length=100,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="A label to tell keys apart, e.g. `ci`.",
    )


class ApiKeyResponse(BaseModel):
    key_id: str
    name: str
    key_prefix: str
    created_at: datetime
    last_used_at: datetime | None = Field(description="Last use, to the minute.")
    revoked_at: datetime | None
    active: bool

    @classmethod
    def of(cls, key: ApiKey) -> ApiKeyResponse:
        return cls(
            key_id=key.id,
            name=key.name,
            key_prefix=key.prefix,
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            revoked_at=key.revoked_at,
            active=key.revoked_at is None,
        )


class CreatedKeyResponse(ApiKeyResponse):
    api_key: str = Field(description="The API key. It is shown only here, once: store it now.")


class ApiKeyList(BaseModel):
    items: list[ApiKeyResponse]


# --- scans -------------------------------------------------------------------


class ScanAccepted(BaseModel):
    scan_id: str
    status: ScanStatus
    image: str
    created_at: datetime


class ScanSummary(BaseModel):
    critical: int
    high: int
    medium: int
    low: int
    unknown: int
    total: int = Field(description="Vulnerabilities of every severity.")
    secrets: int
    misconfigurations: int
    licenses: int

    @classmethod
    def of(cls, scan: Scan) -> ScanSummary | None:
        if scan.status != ScanStatus.COMPLETED:
            return None
        total = scan.critical + scan.high + scan.medium + scan.low + scan.unknown
        return cls(
            critical=scan.critical,
            high=scan.high,
            medium=scan.medium,
            low=scan.low,
            unknown=scan.unknown,
            total=total,
            secrets=scan.secrets,
            misconfigurations=scan.misconfigurations,
            licenses=scan.licenses,
        )


OPTIONS_DESCRIPTION = (
    "The options the scan was submitted with; `timeout_seconds` null means the server's default."
)


def options_of(scan: Scan) -> ScanOptions:
    """Return the scan's options as submitted, with defaults for any a request left out."""
    return ScanOptions.model_validate(scan.options or {})


class ScanListItem(BaseModel):
    scan_id: str
    image: str
    status: ScanStatus
    reason: str | None
    message: str | None = Field(description="Why a failed scan failed, as in the scan itself.")
    options: ScanOptions = Field(description=OPTIONS_DESCRIPTION)
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    summary: ScanSummary | None

    @classmethod
    def of(cls, scan: Scan) -> ScanListItem:
        return cls(
            scan_id=scan.id,
            image=scan.image,
            status=ScanStatus(scan.status),
            reason=scan.reason,
            message=scan.message,
            options=options_of(scan),
            created_at=scan.created_at,
            started_at=scan.started_at,
            completed_at=scan.completed_at,
            summary=ScanSummary.of(scan),
        )


class ScanList(BaseModel):
    items: list[ScanListItem]
    total: int
    page: int
    page_size: int


class OperatingSystem(BaseModel):
    family: str | None
    name: str | None
    eosl: bool | None = Field(
        description="Whether the release is past its end of service life; "
        "null for scans stored before SecAPI recorded it."
    )


class Vulnerability(BaseModel):
    id: str = Field(description="CVE, GHSA or other advisory id.")
    package: str | None
    installed_version: str | None
    fixed_version: str | None
    severity: str
    title: str | None
    target: str | None
    package_type: str | None
    package_path: str | None = Field(
        description="File the package was found in, e.g. its `package.json`; null for OS packages."
    )
    primary_url: str | None


class Secret(BaseModel):
    rule_id: str
    category: str | None
    severity: str
    title: str | None
    target: str | None
    start_line: int | None
    end_line: int | None


class Misconfiguration(BaseModel):
    id: str
    title: str | None
    severity: str
    target: str | None
    message: str | None
    resolution: str | None
    primary_url: str | None


class License(BaseModel):
    name: str = Field(description="License name, an SPDX id where Trivy knows one.")
    package: str | None = Field(
        description="The package under this license; null for a license file."
    )
    severity: str
    category: str | None = Field(
        description="Trivy's license category, e.g. `restricted` or `notice`."
    )
    target: str | None
    package_path: str | None = Field(
        description="File the license was read from; null for OS packages."
    )
    confidence: float | None = Field(description="Trivy's confidence in the match, 0 to 1.")
    link: str | None


class ScanResults(BaseModel):
    summary: ScanSummary
    image_digest: str | None
    os: OperatingSystem | None
    trivy_version: str | None
    db_updated_at: datetime | None
    vulnerabilities: list[Vulnerability] | None = Field(
        None, description="Absent with `include_findings=false`."
    )
    secrets: list[Secret] | None = Field(None, description="Absent with `include_findings=false`.")
    misconfigurations: list[Misconfiguration] | None = Field(
        None, description="Absent with `include_findings=false`."
    )
    licenses: list[License] | None = Field(
        None, description="Absent with `include_findings=false`."
    )

    @classmethod
    def without_findings(cls, scan: Scan, summary: ScanSummary) -> ScanResults:
        """Build the results of a completed scan from its row alone, without the finding lists."""
        os = None
        if scan.os_family or scan.os_name:
            os = OperatingSystem(family=scan.os_family, name=scan.os_name, eosl=scan.os_eosl)
        return cls(
            summary=summary,
            image_digest=scan.image_digest,
            os=os,
            trivy_version=scan.trivy_version,
            db_updated_at=scan.db_updated_at,
        )


class ScanDetail(BaseModel):
    scan_id: str
    image: str
    status: ScanStatus
    reason: str | None = Field(description="Why a scan failed, e.g. `ImageNotFound`.")
    message: str | None = Field(description="What happened, for people.")
    options: ScanOptions = Field(description=OPTIONS_DESCRIPTION)
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    queue_position: int | None = Field(
        description="1-based place among the waiting scans; null unless pending."
    )
    summary: ScanSummary | None
    results: ScanResults | None = Field(description="Null until the scan completed.")


class VulnerabilityPage(BaseModel):
    items: list[Vulnerability]
    total: int
    page: int
    page_size: int


class SecretPage(BaseModel):
    items: list[Secret]
    total: int
    page: int
    page_size: int


class MisconfigurationPage(BaseModel):
    items: list[Misconfiguration]
    total: int
    page: int
    page_size: int


class LicensePage(BaseModel):
    items: list[License]
    total: int
    page: int
    page_size: int


# --- audit and health ---------------------------------------------------------


class AuditEventResponse(BaseModel):
    event_id: int
    occurred_at: datetime
    action: str = Field(description="What was done, e.g. `scan.submit` or `auth.fail`.")
    outcome: AuditOutcome
    actor: str = Field(description="The user's email, or `anonymous`.")
    resource_type: str | None
    resource_id: str | None
    source_ip: str | None
    details: dict[str, Any]

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventResponse:
        return cls(
            event_id=event.id,
            occurred_at=event.occurred_at,
            action=event.action,
            outcome=AuditOutcome(event.outcome),
            actor=event.actor,
            resource_type=event.resource_type,
            resource_id=event.resource_id,
            source_ip=event.source_ip,
            details=event.details,
        )


class AuditPage(BaseModel):
    items: list[AuditEventResponse]
    total: int
    page: int
    page_size: int


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(
        description="`ok` or what failed, for `database`, `redis` (when configured) and `executor`."
    )
