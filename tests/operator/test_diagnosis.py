"""Failure reasons derived from Job and pod objects, as the API server returns them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from secapi.core.scans.reasons import FailureReason
from secapi.operator.diagnosis import diagnose_failed_job, diagnose_stuck_job

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
PENDING = timedelta(seconds=60)
PULL_GRACE = timedelta(seconds=30)


def stamp(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_job(
    *, failed_reason: str | None = None, age: float = 5, deadline: int = 600
) -> dict[str, Any]:
    job: dict[str, Any] = {
        "metadata": {"name": "scan-abc", "creationTimestamp": stamp(age)},
        "spec": {"activeDeadlineSeconds": deadline},
        "status": {"startTime": stamp(age)},
    }
    if failed_reason:
        job["status"]["conditions"] = [
            {"type": "Failed", "status": "True", "reason": failed_reason}
        ]
    return job


def make_pod(
    *,
    phase: str = "Running",
    age: float = 5,
    waiting: str | None = None,
    terminated: dict[str, Any] | None = None,
    scheduled: bool = True,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if waiting:
        state["waiting"] = {"reason": waiting, "message": f"{waiting} detail"}
    if terminated:
        state["terminated"] = terminated
    pod: dict[str, Any] = {
        "metadata": {"name": "scan-abc-x1", "creationTimestamp": stamp(age)},
        "spec": {
            "containers": [
                {"name": "trivy", "image": "scanner:1", "resources": {"limits": {"memory": "2Gi"}}}
            ],
        },
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "trivy", "state": state}] if state else [],
        },
    }
    if scheduled:
        pod["spec"]["nodeName"] = "node-1"
    else:
        pod["status"]["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/1 nodes",
            }
        ]
    return pod


def never_called(text: str, exit_code: int) -> tuple[str, str]:
    raise AssertionError("the scanner error classifier must not run for this failure")


def classify(text: str, exit_code: int) -> tuple[str, str]:
    if "MANIFEST_UNKNOWN" in text:
        return "ImageNotFound", "image not found"
    return "ScannerError", f"exit {exit_code}"


def test_deadline_exceeded_is_timeout() -> None:
    failure = diagnose_failed_job(
        make_job(failed_reason="DeadlineExceeded", deadline=90),
        make_pod(phase="Failed"),
        container="trivy",
        log_tail="",
        classify_scanner_error=never_called,
    )
    assert failure.reason == FailureReason.TIMEOUT
    assert "90 seconds" in failure.message


def test_oom_killed_container_is_oom() -> None:
    pod = make_pod(phase="Failed", terminated={"reason": "OOMKilled", "exitCode": 137})
    failure = diagnose_failed_job(
        make_job(failed_reason="BackoffLimitExceeded"),
        pod,
        container="trivy",
        log_tail="",
        classify_scanner_error=never_called,
    )
    assert failure.reason == FailureReason.OOM_KILLED
    assert "2Gi" in failure.message


def test_missing_pod_is_interrupted() -> None:
    failure = diagnose_failed_job(
        make_job(failed_reason="BackoffLimitExceeded"),
        None,
        container="trivy",
        log_tail="",
        classify_scanner_error=never_called,
    )
    assert failure.reason == FailureReason.INTERRUPTED


def test_trivy_error_goes_to_classifier() -> None:
    pod = make_pod(phase="Failed", terminated={"reason": "Error", "exitCode": 1})
    failure = diagnose_failed_job(
        make_job(failed_reason="BackoffLimitExceeded"),
        pod,
        container="trivy",
        log_tail="FATAL ... MANIFEST_UNKNOWN: manifest unknown",
        classify_scanner_error=classify,
    )
    assert failure.reason == FailureReason.IMAGE_NOT_FOUND


def test_running_job_is_not_stuck() -> None:
    assert (
        diagnose_stuck_job(
            make_job(age=30),
            make_pod(age=30),
            container="trivy",
            now=NOW,
            pending_timeout=PENDING,
            image_pull_grace=PULL_GRACE,
        )
        is None
    )


def test_image_pull_fails_after_grace() -> None:
    early = diagnose_stuck_job(
        make_job(age=10),
        make_pod(phase="Pending", age=10, waiting="ImagePullBackOff"),
        container="trivy",
        now=NOW,
        pending_timeout=PENDING,
        image_pull_grace=PULL_GRACE,
    )
    late = diagnose_stuck_job(
        make_job(age=40),
        make_pod(phase="Pending", age=40, waiting="ImagePullBackOff"),
        container="trivy",
        now=NOW,
        pending_timeout=PENDING,
        image_pull_grace=PULL_GRACE,
    )
    assert early is None
    assert late is not None
    assert late.reason == FailureReason.SCANNER_IMAGE_PULL_FAILED
    assert "scanner:1" in late.message


def test_invalid_image_name_fails_at_once() -> None:
    failure = diagnose_stuck_job(
        make_job(age=1),
        make_pod(phase="Pending", age=1, waiting="InvalidImageName"),
        container="trivy",
        now=NOW,
        pending_timeout=PENDING,
        image_pull_grace=PULL_GRACE,
    )
    assert failure is not None
    assert failure.reason == FailureReason.SCANNER_IMAGE_PULL_FAILED


def test_unscheduled_pod_fails_after_pending_timeout() -> None:
    early = diagnose_stuck_job(
        make_job(age=30),
        make_pod(phase="Pending", age=30, scheduled=False),
        container="trivy",
        now=NOW,
        pending_timeout=PENDING,
        image_pull_grace=PULL_GRACE,
    )
    late = diagnose_stuck_job(
        make_job(age=61),
        make_pod(phase="Pending", age=61, scheduled=False),
        container="trivy",
        now=NOW,
        pending_timeout=PENDING,
        image_pull_grace=PULL_GRACE,
    )
    assert early is None
    assert late is not None
    assert late.reason == FailureReason.UNSCHEDULABLE
    assert "0/1 nodes" in late.message


def test_job_without_pod_fails_after_pending_timeout() -> None:
    failure = diagnose_stuck_job(
        make_job(age=61),
        None,
        container="trivy",
        now=NOW,
        pending_timeout=PENDING,
        image_pull_grace=PULL_GRACE,
    )
    assert failure is not None
    assert failure.reason == FailureReason.UNSCHEDULABLE


def test_pod_stuck_creating_is_scanner_error() -> None:
    failure = diagnose_stuck_job(
        make_job(age=61),
        make_pod(phase="Pending", age=61, waiting="ContainerCreating"),
        container="trivy",
        now=NOW,
        pending_timeout=PENDING,
        image_pull_grace=PULL_GRACE,
    )
    assert failure is not None
    assert failure.reason == FailureReason.SCANNER_ERROR
    assert "ContainerCreating" in failure.message


def test_job_far_past_deadline_is_timeout() -> None:
    failure = diagnose_stuck_job(
        make_job(age=200, deadline=100),
        make_pod(age=200),
        container="trivy",
        now=NOW,
        pending_timeout=PENDING,
        image_pull_grace=PULL_GRACE,
    )
    assert failure is not None
    assert failure.reason == FailureReason.TIMEOUT
