"""Build the status patches of a Scan: pure functions from a state change to a merge patch.

Each function returns the whole `status` for one phase, with every key the
phase does not use set to None, so a JSON merge patch clears what an earlier
generation left behind. The status never carries the report: only counts, a
digest and short texts, so a Scan stays a few KiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from secapi.core.executors.scan_resource import Phase

CONDITION_SUCCEEDED = "Succeeded"
# Maximum length of a message in a status or condition, in characters (the CRD allows 2048).
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class Summary:
    """Finding counts of a completed scan."""

    critical: int = 0
    high: int = 0
    medium: int = 0
    low: int = 0
    unknown: int = 0
    secrets: int = 0
    misconfigurations: int = 0

    @property
    def total(self) -> int:
        return self.critical + self.high + self.medium + self.low + self.unknown

    def to_status(self) -> dict[str, int]:
        return {
            "critical": self.critical,
            "high": self.high,
            "medium": self.medium,
            "low": self.low,
            "unknown": self.unknown,
            "total": self.total,
            "secrets": self.secrets,
            "misconfigurations": self.misconfigurations,
        }


def timestamp(moment: datetime) -> str:
    """Format a time as Kubernetes does: RFC 3339 in UTC with a Z and whole seconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str | None) -> datetime | None:
    """Read a Kubernetes timestamp; None for a missing or unreadable one."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def shorten(message: str, limit: int = MAX_MESSAGE) -> str:
    """Cut a message to `limit` characters, marking the cut."""
    if len(message) <= limit:
        return message
    return message[: limit - 3].rstrip() + "..."


def _condition(
    *, status: str, reason: str, message: str, generation: int, now: datetime
) -> dict[str, Any]:
    return {
        "type": CONDITION_SUCCEEDED,
        "status": status,
        "reason": reason,
        "message": shorten(message),
        "observedGeneration": generation,
        "lastTransitionTime": timestamp(now),
    }


def _base(
    *,
    phase: Phase,
    generation: int,
    message: str,
    condition_status: str,
    condition_reason: str,
    now: datetime,
) -> dict[str, Any]:
    return {
        "phase": phase.value,
        "observedGeneration": generation,
        "reason": None,
        "message": shorten(message),
        "jobName": None,
        "imageDigest": None,
        "trivyVersion": None,
        "summary": None,
        "startedAt": None,
        "completedAt": None,
        "conditions": [
            _condition(
                status=condition_status,
                reason=condition_reason,
                message=message,
                generation=generation,
                now=now,
            )
        ],
    }


def pending_status(*, generation: int, reason: str, message: str, now: datetime) -> dict[str, Any]:
    """Return the status of a Scan the operator could not queue yet, such as while the DB is down."""
    status = _base(
        phase=Phase.PENDING,
        generation=generation,
        message=message,
        condition_status="Unknown",
        condition_reason=reason,
        now=now,
    )
    # observedGeneration stays unset, so the operator tries this generation again.
    status["observedGeneration"] = None
    status["reason"] = reason
    return status


def queued_status(*, generation: int, scan_id: str, priority: int, now: datetime) -> dict[str, Any]:
    """Return the status of a Scan that waits for a free scan slot."""
    status = _base(
        phase=Phase.QUEUED,
        generation=generation,
        message="waiting for a free scan slot",
        condition_status="Unknown",
        condition_reason="Queued",
        now=now,
    )
    status.update(scanId=scan_id, priority=priority, queuedAt=timestamp(now))
    return status


def running_status(
    *, generation: int, job_name: str, started_at: datetime, now: datetime
) -> dict[str, Any]:
    """Return the status of a Scan whose Job exists.

    scanId, priority and queuedAt are left out, so the patch keeps them.
    """
    status = _base(
        phase=Phase.RUNNING,
        generation=generation,
        message=f"the scan runs in Job {job_name}",
        condition_status="Unknown",
        condition_reason="Running",
        now=now,
    )
    status.update(jobName=job_name, startedAt=timestamp(started_at))
    return status


def completed_status(
    *,
    generation: int,
    job_name: str | None,
    summary: Summary,
    image_digest: str | None,
    trivy_version: str | None,
    started_at: datetime | None,
    completed_at: datetime,
    now: datetime,
) -> dict[str, Any]:
    """Return the status of a Scan whose report is stored."""
    message = (
        f"found {summary.critical} critical, {summary.high} high, {summary.medium} medium, "
        f"{summary.low} low and {summary.unknown} unknown vulnerabilities, "
        f"{summary.secrets} secrets and {summary.misconfigurations} misconfigurations"
    )
    status = _base(
        phase=Phase.COMPLETED,
        generation=generation,
        message=message,
        condition_status="True",
        condition_reason="Completed",
        now=now,
    )
    status.update(
        jobName=job_name,
        summary=summary.to_status(),
        imageDigest=image_digest,
        trivyVersion=trivy_version,
        startedAt=timestamp(started_at) if started_at else None,
        completedAt=timestamp(completed_at),
    )
    return status


def failed_status(
    *,
    generation: int,
    reason: str,
    message: str,
    job_name: str | None,
    started_at: datetime | None,
    completed_at: datetime,
    now: datetime,
) -> dict[str, Any]:
    """Return the status of a Scan that ended without a stored report."""
    status = _base(
        phase=Phase.FAILED,
        generation=generation,
        message=message,
        condition_status="False",
        condition_reason=reason,
        now=now,
    )
    status.update(
        reason=reason,
        jobName=job_name,
        startedAt=timestamp(started_at) if started_at else None,
        completedAt=timestamp(completed_at),
    )
    return status
