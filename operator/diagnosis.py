"""Tell why a scan Job failed or is stuck, from the Job and pod objects alone.

Pure functions over the JSON dicts the API server returns, so every failure
reason is tested without a cluster. What Trivy itself printed is classified
by the scan core (`classify_scanner_error`), the same way for both executors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from secapi.core.scans.reasons import FailureReason
from secapi.operator.status import parse_timestamp

# Waiting reasons of a container whose image cannot be pulled (kubelet's names).
IMAGE_PULL_WAITING = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "RegistryUnavailable"}
)
# Waiting reasons that no amount of waiting fixes.
IMAGE_PULL_FATAL = frozenset({"InvalidImageName", "ErrImageNeverPull"})
# Extra seconds past a Job's activeDeadlineSeconds before the operator stops
# waiting for the Job controller to fail the Job itself.
DEADLINE_GRACE_SECONDS = 60


@dataclass(frozen=True)
class Failure:
    """Why a scan failed: a stable reason and a message for people."""

    reason: FailureReason
    message: str


def job_condition(job: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """Return the Job's condition of type `kind` when its status is True."""
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition  # type: ignore[no-any-return]
    return None


def job_succeeded(job: Mapping[str, Any]) -> bool:
    return job_condition(job, "Complete") is not None


def job_failed(job: Mapping[str, Any]) -> bool:
    return job_condition(job, "Failed") is not None


def container_status(pod: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    """Return the status of container `name` of a pod, empty when it has none yet."""
    if not pod:
        return {}
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == name:
            return status  # type: ignore[no-any-return]
    return {}


def _memory_limit(pod: Mapping[str, Any] | None, container: str) -> str:
    for spec in (pod or {}).get("spec", {}).get("containers") or []:
        if spec.get("name") == container:
            return str(spec.get("resources", {}).get("limits", {}).get("memory", "unset"))
    return "unset"


def diagnose_failed_job(
    job: Mapping[str, Any],
    pod: Mapping[str, Any] | None,
    *,
    container: str,
    log_tail: str,
    classify_scanner_error: Any,
) -> Failure:
    """Return why a Job that ended in Failed failed.

    `log_tail` is the end of the container's log (Trivy prints its error
    there); `classify_scanner_error(text, exit_code)` maps it to a Failure
    reason and message.
    """
    job_name = job.get("metadata", {}).get("name", "")
    failed = job_condition(job, "Failed") or {}
    deadline = job.get("spec", {}).get("activeDeadlineSeconds")

    if failed.get("reason") == "DeadlineExceeded":
        return Failure(
            FailureReason.TIMEOUT,
            f"the scan did not finish within its time limit of {deadline} seconds; "
            "raise spec.timeout, or check that the registry responds quickly",
        )

    terminated = container_status(pod, container).get("state", {}).get("terminated") or {}
    if terminated.get("reason") == "OOMKilled":
        return Failure(
            FailureReason.OOM_KILLED,
            f"the scan container ran out of memory (limit {_memory_limit(pod, container)}); "
            "raise the operator's scan memory limit for images this large",
        )

    if pod is None or not terminated:
        return Failure(
            FailureReason.INTERRUPTED,
            f"the pod of Job {job_name} was deleted or lost before it finished; "
            "apply the Scan with a changed spec or submit it again to rerun it",
        )

    exit_code = int(terminated.get("exitCode", 1))
    reason, message = classify_scanner_error(log_tail, exit_code)
    return Failure(FailureReason(reason), message)


def diagnose_stuck_job(
    job: Mapping[str, Any],
    pod: Mapping[str, Any] | None,
    *,
    container: str,
    now: datetime,
    pending_timeout: timedelta,
    image_pull_grace: timedelta,
) -> Failure | None:
    """Return a Failure for a Job that is not finished but will not finish; None while it may.

    A pod that cannot pull the scanner image fails after `image_pull_grace`,
    or at once when the image name is invalid. A pod that was never scheduled
    or started fails after `pending_timeout`. A Job still running well past
    its deadline fails as timed out.
    """
    job_name = job.get("metadata", {}).get("name", "")
    created = parse_timestamp(job.get("metadata", {}).get("creationTimestamp")) or now
    started = parse_timestamp(job.get("status", {}).get("startTime")) or created
    deadline = job.get("spec", {}).get("activeDeadlineSeconds")

    if deadline is not None:
        limit = started + timedelta(seconds=int(deadline) + DEADLINE_GRACE_SECONDS)
        if now > limit:
            return Failure(
                FailureReason.TIMEOUT,
                f"the scan did not finish within its time limit of {deadline} seconds "
                f"and Job {job_name} was not stopped by Kubernetes; raise spec.timeout",
            )

    if pod is None:
        if now - created > pending_timeout:
            return Failure(
                FailureReason.UNSCHEDULABLE,
                f"Job {job_name} created no pod within {int(pending_timeout.total_seconds())} "
                f"seconds; `kubectl describe job {job_name}` shows why (quota, admission)",
            )
        return None

    phase = pod.get("status", {}).get("phase")
    if phase != "Pending":
        return None

    pod_created = parse_timestamp(pod.get("metadata", {}).get("creationTimestamp")) or created
    waiting = container_status(pod, container).get("state", {}).get("waiting") or {}
    waiting_reason = waiting.get("reason", "")
    if waiting_reason in IMAGE_PULL_WAITING or waiting_reason in IMAGE_PULL_FATAL:
        if waiting_reason in IMAGE_PULL_FATAL or now - pod_created > image_pull_grace:
            image = next(
                (
                    spec.get("image", "")
                    for spec in pod.get("spec", {}).get("containers") or []
                    if spec.get("name") == container
                ),
                "",
            )
            detail = waiting.get("message") or waiting_reason
            return Failure(
                FailureReason.SCANNER_IMAGE_PULL_FAILED,
                f"the scanner image {image} could not be pulled ({detail}); check the "
                "operator's scanner image setting and the node's access to its registry",
            )
        return None

    if now - pod_created <= pending_timeout:
        return None

    seconds = int(pending_timeout.total_seconds())
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            detail = condition.get("message") or condition.get("reason") or "no node fits"
            return Failure(
                FailureReason.UNSCHEDULABLE,
                f"the scan pod was not scheduled within {seconds} seconds ({detail}); "
                "check the scan node selector, tolerations and resource requests",
            )
    if not pod.get("spec", {}).get("nodeName"):
        return Failure(
            FailureReason.UNSCHEDULABLE,
            f"the scan pod was not scheduled within {seconds} seconds; check the scan "
            "node selector, tolerations and resource requests",
        )
    detail = waiting_reason or "no container state reported"
    return Failure(
        FailureReason.SCANNER_ERROR,
        f"the scan pod did not start within {seconds} seconds ({detail}); "
        f"`kubectl describe pod {pod.get('metadata', {}).get('name', '')}` shows why, "
        "for example a missing registry Secret",
    )
