"""Status patches of each phase and the order of the scan queue."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from secapi.operator.queue import QueuedScan, queue_order, select_admissions
from secapi.operator.status import (
    Summary,
    completed_status,
    failed_status,
    pending_status,
    queued_status,
    running_status,
)

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_queued_status_clears_previous_result() -> None:
    status = queued_status(generation=2, scan_id="id-1", priority=10, now=NOW)

    assert status["phase"] == "Queued"
    assert status["observedGeneration"] == 2
    assert status["scanId"] == "id-1"
    assert status["priority"] == 10
    assert status["queuedAt"] == "2025-01-01T12:00:00Z"
    # None removes the key in a JSON merge patch, so nothing of generation 1 survives.
    for key in ("summary", "reason", "imageDigest", "jobName", "completedAt", "trivyVersion"):
        assert key in status
        assert status[key] is None
    [condition] = status["conditions"]
    assert condition["type"] == "Succeeded"
    assert condition["status"] == "Unknown"


def test_running_status_keeps_scan_id() -> None:
    status = running_status(generation=1, job_name="job-1", started_at=NOW, now=NOW)

    assert status["phase"] == "Running"
    assert status["jobName"] == "job-1"
    assert status["startedAt"] == "2025-01-01T12:00:00Z"
    assert "scanId" not in status
    assert "priority" not in status


def test_completed_status_has_summary_only() -> None:
    summary = Summary(critical=1, high=2, medium=3, low=4, unknown=5, secrets=6)
    status = completed_status(
        generation=1,
        job_name="job-1",
        summary=summary,
        image_digest="sha256:" + "a" * 64,
        trivy_version="0.74.0",
        started_at=NOW,
        completed_at=NOW + timedelta(seconds=30),
        now=NOW,
    )

    assert status["phase"] == "Completed"
    assert status["summary"] == {
        "critical": 1,
        "high": 2,
        "medium": 3,
        "low": 4,
        "unknown": 5,
        "total": 15,
        "secrets": 6,
        "misconfigurations": 0,
    }
    assert status["conditions"][0]["status"] == "True"
    assert len(json.dumps(status)) < 2048


def test_failed_status_carries_reason() -> None:
    status = failed_status(
        generation=3,
        reason="OOMKilled",
        message="x" * 5000,
        job_name=None,
        started_at=None,
        completed_at=NOW,
        now=NOW,
    )

    assert status["phase"] == "Failed"
    assert status["reason"] == "OOMKilled"
    assert status["conditions"][0]["status"] == "False"
    assert status["conditions"][0]["reason"] == "OOMKilled"
    assert len(status["message"]) <= 1024
    assert status["message"].endswith("...")


def test_pending_status_leaves_generation_unobserved() -> None:
    status = pending_status(generation=4, reason="DatabaseUnavailable", message="waiting", now=NOW)

    assert status["phase"] == "Pending"
    assert status["observedGeneration"] is None
    assert status["reason"] == "DatabaseUnavailable"


def entry(name: str, *, priority: int = 0, age: int = 0) -> QueuedScan:
    return QueuedScan(
        namespace="ns", name=name, priority=priority, queued_at=NOW - timedelta(seconds=age)
    )


def test_queue_orders_priority_then_age() -> None:
    scans = [
        entry("free-new", priority=0, age=1),
        entry("free-old", priority=0, age=100),
        entry("pro-new", priority=10, age=1),
        entry("enterprise", priority=20, age=0),
    ]
    assert [scan.name for scan in queue_order(scans)] == [
        "enterprise",
        "pro-new",
        "free-old",
        "free-new",
    ]


def test_admission_fills_free_slots_only() -> None:
    scans = [entry(f"s{index}", age=index) for index in range(10)]

    assert [scan.name for scan in select_admissions(scans, existing_jobs=3, limit=5)] == [
        "s9",
        "s8",
    ]
    assert select_admissions(scans, existing_jobs=5, limit=5) == []
    assert select_admissions(scans, existing_jobs=7, limit=5) == []
    assert len(select_admissions(scans, existing_jobs=0, limit=50)) == 10
