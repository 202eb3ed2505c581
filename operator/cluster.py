"""One consistent look at the operator's objects: Scans, their Jobs and the Jobs' pods.

The reconcile loop decides from lists, not from watch caches: a list is a
quorum read, so a Job the loop created a moment ago is always counted when it
decides how many more Jobs may start.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from secapi.core.executors.kube_client import KubeClient
from secapi.core.executors.scan_resource import (
    GENERATION_LABEL,
    MANAGED_BY_LABEL,
    OPERATOR_MANAGER,
    SCAN_UID_LABEL,
)
from secapi.operator.diagnosis import job_failed, job_succeeded

MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={OPERATOR_MANAGER}"


def job_scan_uid(job: dict[str, Any]) -> str | None:
    """Return the uid of the Scan that owns a Job, from its owner reference."""
    for owner in job.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == "Scan" and owner.get("controller"):
            return str(owner.get("uid"))
    return (job.get("metadata", {}).get("labels") or {}).get(SCAN_UID_LABEL)


def job_generation(job: dict[str, Any]) -> int | None:
    value = (job.get("metadata", {}).get("labels") or {}).get(GENERATION_LABEL)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclass
class Snapshot:
    """Scans, Jobs and pods of the watched namespaces, listed at one moment."""

    scans: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)

    def jobs_of_scan(self, uid: str) -> list[dict[str, Any]]:
        return [job for job in self.jobs if job_scan_uid(job) == uid]

    def job_named(self, namespace: str, name: str) -> dict[str, Any] | None:
        for job in self.jobs:
            metadata = job["metadata"]
            if metadata["namespace"] == namespace and metadata["name"] == name:
                return job
        return None

    def pod_of_job(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """Return the newest pod the Job controller made for a Job."""
        job_uid = job["metadata"]["uid"]
        pods = [
            pod
            for pod in self.pods
            if any(
                owner.get("uid") == job_uid
                for owner in pod.get("metadata", {}).get("ownerReferences") or []
            )
        ]
        if not pods:
            return None
        return max(pods, key=lambda pod: pod["metadata"].get("creationTimestamp", ""))


async def take_snapshot(kube: KubeClient, namespaces: Iterable[str]) -> Snapshot:
    snapshot = Snapshot()
    for namespace in sorted(set(namespaces)):
        snapshot.scans += await kube.list_scans(namespace)
        snapshot.jobs += await kube.list_jobs(namespace, label_selector=MANAGED_SELECTOR)
        snapshot.pods += await kube.list_pods(namespace, label_selector=MANAGED_SELECTOR)
    return snapshot


def job_finished(job: dict[str, Any]) -> bool:
    """Return whether a Job has a Complete or Failed condition, that is, whether it has ended."""
    return job_succeeded(job) or job_failed(job)


async def count_unfinished_jobs(kube: KubeClient, namespaces: Iterable[str]) -> int:
    """Count the scan Jobs that exist now and have not finished.

    A finished Job waiting for the operator to store its result and delete it
    runs nothing, so it does not take one of the maxConcurrentScans slots.
    """
    total = 0
    for namespace in sorted(set(namespaces)):
        jobs = await kube.list_jobs(namespace, label_selector=MANAGED_SELECTOR)
        total += sum(
            1
            for job in jobs
            if not job["metadata"].get("deletionTimestamp") and not job_finished(job)
        )
    return total
