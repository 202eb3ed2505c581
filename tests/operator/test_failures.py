"""Every way a scan fails ends in phase Failed with its stable reason, in the status and the database.

Faults come from the fake kubelet's switches (tests/testbed/kubelet/faults.py)
or from real registry responses; nothing is simulated inside the operator.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from secapi.core.executors.kube_client import KubeClient
from secapi.core.settings import KubernetesSettings
from secapi.operator.jobs import ScanJobSource, build_job
from secapi.operator.report_log import BEGIN_MARKER, END_MARKER
from tests.operator.conftest import (
    OperatorFactory,
    query,
    scan_manifest,
    wait_for,
    wait_for_phase,
)
from tests.operator.registry_proxy import AuthRegistry, start_auth_registry
from tests.testbed.bed import Testbed
from tests.testbed.kubelet import faults

pytestmark = pytest.mark.cluster

MANAGED = "app.kubernetes.io/managed-by=secapi-operator"


def fixture_image(testbed: Testbed, name: str = "alpine:3.17") -> str:
    return f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/{name}"


async def assert_failed(
    admin: KubeClient,
    database_url: str,
    namespace: str,
    name: str,
    reason: str,
    *,
    within: float = 120,
) -> dict[str, Any]:
    """Wait for a Scan to end and check its reason in the status, the database and the Job list."""
    scan = await wait_for_phase(admin, namespace, name, within=within)
    status = scan["status"]
    assert status["phase"] == "Failed", status
    assert status["reason"] == reason, status
    assert status["message"]
    assert status["conditions"][0]["status"] == "False"
    assert status["conditions"][0]["reason"] == reason

    rows = query(
        database_url, "SELECT status, reason, message FROM scans WHERE id = %s", status["scanId"]
    )
    assert rows == [("failed", reason, status["message"])]

    async def jobs_gone() -> bool:
        return await admin.list_jobs(namespace, label_selector=MANAGED) == []

    await wait_for(jobs_gone, within=30, what="the failed scan's Job to be deleted")
    return scan


async def create_scan(
    admin: KubeClient, namespace: str, name: str, image: str, **spec: Any
) -> None:
    await admin.create_scan(namespace, scan_manifest(name, image, **spec))


async def test_missing_image_is_image_not_found(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    await start_operator(namespace)
    await create_scan(admin, namespace, "missing", fixture_image(testbed, "does-not-exist:1.0"))
    scan = await assert_failed(admin, database_url, namespace, "missing", "ImageNotFound")
    assert (
        "does-not-exist" in scan["status"]["message"]
        or "MANIFEST" in scan["status"]["message"].upper()
    )


@pytest_asyncio.fixture
async def auth_registry(testbed: Testbed) -> AsyncIterator[AuthRegistry]:
    registry = await start_auth_registry(testbed.env["SECAPI_TEST_REGISTRY"])
    try:
        yield registry
    finally:
        await registry.close()


async def test_registry_without_credentials_is_auth_failed(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
    auth_registry: AuthRegistry,
) -> None:
    await start_operator(namespace)
    await create_scan(admin, namespace, "private", f"{auth_registry.address}/fixtures/alpine:3.17")
    scan = await assert_failed(admin, database_url, namespace, "private", "RegistryAuthFailed")
    assert auth_registry.password not in scan["status"]["message"]


async def test_registry_secret_reaches_trivy(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
    auth_registry: AuthRegistry,
) -> None:
    await admin.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        body={
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "registry-login"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {
                ".dockerconfigjson": base64.b64encode(
                    auth_registry.docker_config().encode()
                ).decode()
            },
        },
    )
    await start_operator(namespace)
    await create_scan(
        admin,
        namespace,
        "private",
        f"{auth_registry.address}/fixtures/alpine:3.17",
        registrySecretRef={"name": "registry-login"},
    )
    scan = await wait_for_phase(admin, namespace, "private")

    assert scan["status"]["phase"] == "Completed", scan["status"]
    assert scan["status"]["summary"]["total"] > 0
    assert auth_registry.password not in str(scan)


@pytest.mark.parametrize(
    ("fault", "seconds", "reason", "spec", "settings"),
    [
        pytest.param("oom", 0.5, "OOMKilled", {}, {}, id="oom"),
        pytest.param("truncate-log", None, "ReportTruncated", {}, {}, id="truncated-log"),
        pytest.param("hang", None, "Timeout", {"timeout": "10s"}, {}, id="deadline"),
        pytest.param(
            "image-pull",
            None,
            "ScannerImagePullFailed",
            {},
            {"SECAPI_KUBERNETES__IMAGE_PULL_GRACE_SECONDS": "2"},
            id="scanner-image-pull",
        ),
        pytest.param(
            "unschedulable",
            None,
            "Unschedulable",
            {},
            {"SECAPI_KUBERNETES__PENDING_TIMEOUT_SECONDS": "10"},
            id="unschedulable",
        ),
        pytest.param("vanish", 0.5, "Interrupted", {}, {}, id="pod-vanished"),
    ],
)
async def test_kubelet_fault_ends_with_reason(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
    fault: str,
    seconds: float | None,
    reason: str,
    spec: dict[str, Any],
    settings: dict[str, str],
) -> None:
    faults.add_fault(
        fault, namespace=namespace, labels={"secapi.io/scan": "faulty"}, seconds=seconds
    )
    await start_operator(namespace, **settings)
    await create_scan(admin, namespace, "faulty", fixture_image(testbed), **spec)
    await assert_failed(admin, database_url, namespace, "faulty", reason)


async def test_report_over_maximum_is_too_large(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    await start_operator(namespace, SECAPI_SCANNER__MAX_REPORT_BYTES="1024")
    await create_scan(admin, namespace, "big", fixture_image(testbed))
    await assert_failed(admin, database_url, namespace, "big", "ReportTooLarge")


async def test_deleted_job_is_job_deleted(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    faults.add_fault("hang", namespace=namespace, labels={"secapi.io/scan": "victim"})
    await start_operator(namespace)
    await create_scan(admin, namespace, "victim", fixture_image(testbed))
    running = await wait_for_phase(admin, namespace, "victim", ("Running",), within=60)

    await admin.delete_job(namespace, running["status"]["jobName"])
    await assert_failed(admin, database_url, namespace, "victim", "JobDeleted")


async def test_queued_scan_fails_after_queue_timeout(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    faults.add_fault("hang", namespace=namespace, labels={"secapi.io/scan": "first"})
    await start_operator(
        namespace,
        SECAPI_SCANNER__MAX_CONCURRENT_SCANS="1",
        SECAPI_SCANNER__QUEUE_TIMEOUT_SECONDS="10",
    )
    await create_scan(admin, namespace, "first", fixture_image(testbed), timeout="60s")
    await wait_for_phase(admin, namespace, "first", ("Running",), within=60)
    await create_scan(admin, namespace, "second", fixture_image(testbed))

    scan = await wait_for_phase(admin, namespace, "second", within=60)
    assert scan["status"]["phase"] == "Failed"
    assert scan["status"]["reason"] == "QueueTimeout"
    rows = query(
        database_url, "SELECT status, reason FROM scans WHERE id = %s", scan["status"]["scanId"]
    )
    assert rows == [("failed", "QueueTimeout")]


def report_log_script(report: bytes) -> str:
    """Return a shell script that prints `report` as a well-formed block, markers intact."""
    encoded = base64.encodebytes(gzip.compress(report)).decode()
    digest = hashlib.sha256(report).hexdigest()
    return (
        f"cat <<'END'\n{BEGIN_MARKER} v1 bytes={len(report)} sha256={digest} encoding=gzip+base64\n"
        f"{encoded}{END_MARKER} v1 bytes={len(report)} sha256={digest}\nEND\n"
    )


async def test_unparsable_report_is_report_invalid(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    # The Job exists before the operator starts, so the operator adopts it, and
    # its pod prints an intact block whose JSON is not a Trivy report.
    await create_scan(admin, namespace, "invalid", fixture_image(testbed))
    scan = await admin.get_scan(namespace, "invalid")
    assert scan is not None
    job = build_job(
        ScanJobSource(
            name="invalid",
            namespace=namespace,
            uid=scan["metadata"]["uid"],
            generation=1,
            scan_id="00000000-0000-0000-0000-000000000000",
            image=fixture_image(testbed),
            timeout_seconds=60,
        ),
        KubernetesSettings(),
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["/bin/sh", "-c", report_log_script(b'{"SchemaVersion": "not a report"')]
    container["args"] = []
    await admin.create_job(namespace, job)

    await start_operator(namespace)
    await assert_failed(admin, database_url, namespace, "invalid", "ReportInvalid")


async def test_deleted_scan_takes_job_and_ends_row(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    faults.add_fault("hang", namespace=namespace, labels={"secapi.io/scan": "dropped"})
    await start_operator(namespace)
    await create_scan(admin, namespace, "dropped", fixture_image(testbed))
    running = await wait_for_phase(admin, namespace, "dropped", ("Running",), within=60)

    assert await admin.delete_scan(namespace, "dropped")

    # The owner reference lets the garbage collector delete the Job and its pod.
    async def job_gone() -> bool:
        return await admin.get_job(namespace, running["status"]["jobName"]) is None

    await wait_for(job_gone, within=60, what="the deleted Scan's Job to go")

    async def row_ended() -> list[tuple[Any, ...]] | None:
        rows = query(
            database_url,
            "SELECT status, reason FROM scans WHERE id = %s",
            running["status"]["scanId"],
        )
        return rows if rows and rows[0][0] == "failed" else None

    assert await wait_for(row_ended, within=30, what="the row to end") == [
        ("failed", "Interrupted")
    ]


async def test_unpullable_reference_is_invalid_input(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    # The CRD's pattern accepts it, but Trivy cannot pull a one-character repository.
    await start_operator(namespace)
    await create_scan(admin, namespace, "short", f"{testbed.env['SECAPI_TEST_REGISTRY']}/a:1")
    scan = await assert_failed(admin, database_url, namespace, "short", "InvalidInput")
    assert "2 characters" in scan["status"]["message"]
