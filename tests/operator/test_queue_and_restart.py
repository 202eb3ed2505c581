"""The queue limit under load, and an operator killed in each phase of a scan.

A sampler lists the namespace's scan Jobs every 0.2 s while a test runs, so
the tests see how many Jobs existed and ran at once and every Job that ever
existed. The limit bounds unfinished Jobs: a finished Job waiting for its
result to be stored runs nothing and takes no slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from secapi.core.executors.kube_client import KubeClient
from secapi.operator.cluster import job_finished
from tests.operator.conftest import (
    OperatorFactory,
    query,
    scan_manifest,
    trivy_report,
    wait_for,
    wait_for_phase,
)
from tests.testbed.bed import Testbed
from tests.testbed.kubelet import faults

pytestmark = pytest.mark.cluster

MANAGED = "app.kubernetes.io/managed-by=secapi-operator"


@dataclass
class JobSampler:
    """What the Job list of a namespace showed over time."""

    max_existing: int = 0
    # Jobs without a Complete or Failed condition, the ones the limit counts.
    max_unfinished: int = 0
    max_running_pods: int = 0
    # Job uid by Job name, for every Job ever seen.
    seen: dict[str, set[str]] = field(default_factory=dict)

    def jobs_of(self, prefix: str) -> dict[str, set[str]]:
        return {name: uids for name, uids in self.seen.items() if name.startswith(prefix)}


async def sample(admin: KubeClient, namespace: str, sampler: JobSampler) -> None:
    while True:
        jobs = await admin.list_jobs(namespace, label_selector=MANAGED)
        pods = await admin.list_pods(namespace, label_selector=MANAGED)
        sampler.max_existing = max(sampler.max_existing, len(jobs))
        unfinished = [job for job in jobs if not job_finished(job)]
        sampler.max_unfinished = max(sampler.max_unfinished, len(unfinished))
        running = [pod for pod in pods if pod.get("status", {}).get("phase") == "Running"]
        sampler.max_running_pods = max(sampler.max_running_pods, len(running))
        for job in jobs:
            sampler.seen.setdefault(job["metadata"]["name"], set()).add(job["metadata"]["uid"])
        await asyncio.sleep(0.2)


@pytest_asyncio.fixture
async def jobs_sampler(admin: KubeClient, namespace: str) -> AsyncIterator[JobSampler]:
    sampler = JobSampler()
    task = asyncio.create_task(sample(admin, namespace, sampler))
    try:
        yield sampler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def fixture_image(testbed: Testbed, name: str = "alpine:3.17") -> str:
    return f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/{name}"


def vulnerability_count(testbed: Testbed, image: str) -> int:
    report = trivy_report(testbed, image, "--scanners", "vuln,secret")
    return sum(len(target.get("Vulnerabilities") or []) for target in report.get("Results") or [])


async def all_final(
    admin: KubeClient, namespace: str, names: list[str]
) -> list[dict[str, Any]] | None:
    scans = await admin.list_scans(namespace)
    by_name = {scan["metadata"]["name"]: scan for scan in scans}
    if all(
        (by_name.get(name, {}).get("status") or {}).get("phase") in ("Completed", "Failed")
        for name in names
    ):
        return [by_name[name] for name in names]
    return None


def assert_one_row_each(
    database_url: str, scans: list[dict[str, Any]], expected_findings: int
) -> None:
    """Check that each Scan has one completed row, with its findings stored once."""
    for scan in scans:
        rows = query(
            database_url,
            "SELECT id, status FROM scans WHERE k8s_uid = %s",
            scan["metadata"]["uid"],
        )
        assert rows == [(scan["status"]["scanId"], "completed")], scan["metadata"]["name"]
        [(findings,)] = query(
            database_url,
            "SELECT count(*) FROM findings WHERE scan_id = %s AND kind = 'vulnerability'",
            scan["status"]["scanId"],
        )
        assert findings == expected_findings, scan["metadata"]["name"]


async def test_fifty_scans_never_exceed_five_jobs(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
    jobs_sampler: JobSampler,
) -> None:
    image = fixture_image(testbed)
    # Each pod waits a second before it starts, so Jobs overlap and the limit is reached.
    faults.add_fault("delay-start", namespace=namespace, seconds=1)
    await start_operator(namespace, SECAPI_SCANNER__MAX_CONCURRENT_SCANS="5")
    names = [f"load-{index:02d}" for index in range(50)]
    for name in names:
        await admin.create_scan(namespace, scan_manifest(name, image))

    scans = await wait_for(
        lambda: all_final(admin, namespace, names), within=600, interval=1, what="50 scans to end"
    )

    assert [scan["status"]["phase"] for scan in scans] == ["Completed"] * 50
    assert jobs_sampler.max_unfinished <= 5
    assert jobs_sampler.max_running_pods <= 5
    assert jobs_sampler.max_unfinished >= 3, "the Jobs never overlapped, so the limit went untested"
    assert len(jobs_sampler.seen) == 50
    assert all(len(uids) == 1 for uids in jobs_sampler.seen.values())
    assert_one_row_each(database_url, scans, vulnerability_count(testbed, image))


async def test_restart_while_queued_runs_each_once(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
    jobs_sampler: JobSampler,
) -> None:
    image = fixture_image(testbed)
    faults.add_fault("delay-start", namespace=namespace, seconds=2)
    operator = await start_operator(namespace, SECAPI_SCANNER__MAX_CONCURRENT_SCANS="1")
    names = ["queued-a", "queued-b", "queued-c"]
    for name in names:
        await admin.create_scan(namespace, scan_manifest(name, image))

    await wait_for_phase(admin, namespace, "queued-c", ("Queued",), within=60)
    operator.kill()
    operator.start()

    scans = await wait_for(
        lambda: all_final(admin, namespace, names), within=180, what="3 scans to end"
    )
    assert [scan["status"]["phase"] for scan in scans] == ["Completed"] * 3
    assert jobs_sampler.max_unfinished <= 1
    assert len(jobs_sampler.seen) == 3
    assert all(len(uids) == 1 for uids in jobs_sampler.seen.values())
    assert_one_row_each(database_url, scans, vulnerability_count(testbed, image))


async def test_restart_while_job_runs_adopts_it(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
    jobs_sampler: JobSampler,
) -> None:
    image = fixture_image(testbed)
    faults.add_fault("delay-start", namespace=namespace, seconds=4)
    operator = await start_operator(namespace)
    await admin.create_scan(namespace, scan_manifest("running", image))
    running = await wait_for_phase(admin, namespace, "running", ("Running",), within=60)

    operator.kill()
    await asyncio.sleep(1)
    operator.start()

    scan = await wait_for_phase(admin, namespace, "running", within=120)
    assert scan["status"]["phase"] == "Completed", scan["status"]
    assert scan["status"]["jobName"] == running["status"]["jobName"]
    # One Job, never created twice.
    assert list(jobs_sampler.seen) == [running["status"]["jobName"]]
    assert len(jobs_sampler.seen[running["status"]["jobName"]]) == 1
    assert_one_row_each(database_url, [scan], vulnerability_count(testbed, image))


async def test_restart_after_job_finished_stores_once(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
    jobs_sampler: JobSampler,
) -> None:
    image = fixture_image(testbed)
    faults.add_fault("delay-start", namespace=namespace, seconds=3)
    operator = await start_operator(namespace)
    await admin.create_scan(namespace, scan_manifest("finished", image))
    running = await wait_for_phase(admin, namespace, "finished", ("Running",), within=60)
    operator.kill()

    # The Job completes while no operator runs, so nothing has read its report yet.
    async def job_complete() -> bool:
        job = await admin.get_job(namespace, running["status"]["jobName"])
        conditions = (job or {}).get("status", {}).get("conditions") or []
        return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)

    await wait_for(job_complete, within=120, what="the Job to complete")
    rows = query(
        database_url, "SELECT status FROM scans WHERE id = %s", running["status"]["scanId"]
    )
    assert rows == [("running",)]

    operator.start()
    scan = await wait_for_phase(admin, namespace, "finished", within=120)
    assert scan["status"]["phase"] == "Completed", scan["status"]
    assert len(jobs_sampler.seen) == 1
    assert_one_row_each(database_url, [scan], vulnerability_count(testbed, image))


async def test_existing_job_is_adopted_not_duplicated(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
    jobs_sampler: JobSampler,
) -> None:
    # An operator that stopped right after creating the Job left it unrecorded in the status.
    from secapi.core.scans.options import ScanOptions
    from secapi.core.settings import Settings
    from secapi.operator.jobs import ScanJobSource, build_job, job_trivy_flags

    image = fixture_image(testbed)
    await admin.create_scan(namespace, scan_manifest("adopted", image))
    body = await admin.get_scan(namespace, "adopted")
    assert body is not None
    settings = Settings(scanner={"offline": True, "insecure_registries": True})
    job = build_job(
        ScanJobSource(
            name="adopted",
            namespace=namespace,
            uid=body["metadata"]["uid"],
            generation=1,
            scan_id="00000000-0000-0000-0000-000000000000",
            image=image,
            timeout_seconds=120,
            trivy_flags=tuple(
                job_trivy_flags(ScanOptions(), settings.scanner, timeout_seconds=120)
            ),
        ),
        settings.kubernetes,
    )
    created = await admin.create_job(namespace, job)

    operator = await start_operator(namespace)
    scan = await wait_for_phase(admin, namespace, "adopted", within=120)

    assert scan["status"]["phase"] == "Completed", scan["status"]
    assert scan["status"]["jobName"] == created["metadata"]["name"]
    assert jobs_sampler.seen == {created["metadata"]["name"]: {created["metadata"]["uid"]}}
    assert "existing scan job adopted" in operator.log_text()
    assert_one_row_each(database_url, [scan], vulnerability_count(testbed, image))


async def test_stored_result_is_not_stored_again(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    # The state an operator leaves when it dies after committing the result and
    # before writing the status: the row is completed, the Scan still Running,
    # and its finished Job still there.
    from secapi.core.scans.options import ScanOptions
    from secapi.core.settings import Settings
    from secapi.operator.jobs import ScanJobSource, build_job, job_trivy_flags

    image = fixture_image(testbed)
    operator = await start_operator(namespace)
    await admin.create_scan(namespace, scan_manifest("stored", image))
    done = await wait_for_phase(admin, namespace, "stored", within=120)
    assert done["status"]["phase"] == "Completed"
    operator.stop()

    settings = Settings(scanner={"offline": True, "insecure_registries": True})
    job = build_job(
        ScanJobSource(
            name="stored",
            namespace=namespace,
            uid=done["metadata"]["uid"],
            generation=1,
            scan_id=done["status"]["scanId"],
            image=image,
            timeout_seconds=120,
            trivy_flags=tuple(
                job_trivy_flags(ScanOptions(), settings.scanner, timeout_seconds=120)
            ),
        ),
        settings.kubernetes,
    )
    await admin.create_job(namespace, job)

    async def job_complete() -> bool:
        found = await admin.get_job(namespace, job["metadata"]["name"])
        conditions = (found or {}).get("status", {}).get("conditions") or []
        return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)

    await wait_for(job_complete, within=120, what="the Job to complete")
    await admin.patch_scan_status(
        namespace,
        "stored",
        {
            "phase": "Running",
            "jobName": job["metadata"]["name"],
            "summary": None,
            "completedAt": None,
        },
    )

    operator.start()
    scan = await wait_for_phase(admin, namespace, "stored", within=120)
    assert scan["status"]["phase"] == "Completed", scan["status"]
    assert scan["status"]["summary"] == done["status"]["summary"]
    assert await admin.get_job(namespace, job["metadata"]["name"]) is None
    assert "scan results stored" not in operator.log_text().split("===== operator start 2 =====")[1]
    assert_one_row_each(database_url, [scan], vulnerability_count(testbed, image))
