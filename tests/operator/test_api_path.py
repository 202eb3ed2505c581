"""Scans submitted through the REST API with the kubernetes executor, run by the operator.

The API app runs in-process (httpx's ASGI transport, with its lifespan) with
the token of a ServiceAccount bound to the API's rules, and the operator in
a subprocess with the operator's rules.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from secapi.api.app import create_app
from secapi.core.executors.kube_client import KubeClient
from secapi.core.settings import Settings
from tests.operator.conftest import (
    OperatorFactory,
    query,
    service_account_kubeconfig,
    trivy_report,
    wait_for,
    write_token_kubeconfig,
)
from tests.testbed.bed import Testbed
from tests.testbed.kubelet import faults

pytestmark = pytest.mark.cluster

ApiFactory = Callable[[Path], Awaitable[httpx.AsyncClient]]


@pytest_asyncio.fixture
async def api_client(
    namespace: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ApiFactory]:
    """Return a factory of API clients whose kubernetes executor uses the given kubeconfig."""
    async with AsyncExitStack() as stack:

        async def make(kubeconfig: Path) -> httpx.AsyncClient:
            monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
            settings = Settings(
                environment="development",
                database_url=database_url,
                redis_url=None,
                secret_key="operator-tests-" + "k" * 40,
                data_dir=tmp_path / "data",
                executor="kubernetes",
                namespace=namespace,
                rate_limit_enabled=False,
            )
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 40000)),
                base_url="http://testserver",
            )
            await stack.enter_async_context(client)
            return client

        yield make


async def register(client: httpx.AsyncClient) -> dict[str, str]:
    response = await client.post(
        "/api/v1/auth/register", json={"email": f"op-{uuid.uuid4().hex[:10]}@example.com"}
    )
    assert response.status_code == 201, response.text
    return {"X-API-Key": response.json()["api_key"]}


async def wait_for_scan(
    client: httpx.AsyncClient, headers: dict[str, str], scan_id: str, *, within: float = 180
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        response = await client.get(f"/api/v1/scans/{scan_id}", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body if body["status"] in ("completed", "failed") else None

    result: dict[str, Any] = await wait_for(check, within=within, what=f"scan {scan_id} to end")
    return result


async def api_kubeconfig(
    admin: KubeClient, namespace: str, kubeconfig: Path, tmp_path: Path
) -> Path:
    return await service_account_kubeconfig(
        admin,
        namespace=namespace,
        component="api",
        kubeconfig=kubeconfig,
        out=tmp_path / "api.kubeconfig",
    )


async def test_api_scan_runs_as_scan_resource(
    testbed: Testbed,
    kubeconfig: Path,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    tmp_path: Path,
    start_operator: OperatorFactory,
    api_client: ApiFactory,
) -> None:
    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/app:1.0"
    client = await api_client(await api_kubeconfig(admin, namespace, kubeconfig, tmp_path))
    headers = await register(client)
    await start_operator(namespace)

    response = await client.post("/api/v1/scan/docker", json={"image": image}, headers=headers)
    assert response.status_code == 202, response.text
    scan_id = response.json()["scan_id"]

    resources = await admin.list_scans(namespace, label_selector=f"secapi.io/scan-id={scan_id}")
    assert len(resources) == 1
    assert resources[0]["spec"]["image"] == image

    result = await wait_for_scan(client, headers, scan_id)
    assert result["status"] == "completed", result
    expected = trivy_report(testbed, image, "--scanners", "vuln,secret")
    expected_findings = sorted(
        (item["VulnerabilityID"], item["PkgName"], item["InstalledVersion"], item["Severity"])
        for target in expected.get("Results") or []
        for item in target.get("Vulnerabilities") or []
    )
    found = sorted(
        (item["id"], item["package"], item["installed_version"], item["severity"])
        for item in result["results"]["vulnerabilities"]
    )
    assert found == expected_findings
    assert result["summary"]["total"] == len(expected_findings)

    resource = await admin.get_scan(namespace, resources[0]["metadata"]["name"])
    assert resource is not None
    assert resource["status"]["phase"] == "Completed"
    assert resource["status"]["scanId"] == scan_id
    assert resource["status"]["summary"]["total"] == len(expected_findings)


async def test_api_shows_failure_reason(
    testbed: Testbed,
    kubeconfig: Path,
    admin: KubeClient,
    namespace: str,
    tmp_path: Path,
    start_operator: OperatorFactory,
    api_client: ApiFactory,
) -> None:
    client = await api_client(await api_kubeconfig(admin, namespace, kubeconfig, tmp_path))
    headers = await register(client)
    await start_operator(namespace)

    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/not-there:1.0"
    response = await client.post("/api/v1/scan/docker", json={"image": image}, headers=headers)
    assert response.status_code == 202, response.text
    result = await wait_for_scan(client, headers, response.json()["scan_id"])

    assert result["status"] == "failed"
    assert result["reason"] == "ImageNotFound"
    assert result["message"]


async def test_api_delete_removes_row_and_resource(
    testbed: Testbed,
    kubeconfig: Path,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    tmp_path: Path,
    start_operator: OperatorFactory,
    api_client: ApiFactory,
) -> None:
    client = await api_client(await api_kubeconfig(admin, namespace, kubeconfig, tmp_path))
    headers = await register(client)
    await start_operator(namespace)
    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/alpine:3.17"

    # One finished scan and one that is deleted while it still runs.
    done = (await client.post("/api/v1/scan/docker", json={"image": image}, headers=headers)).json()
    await wait_for_scan(client, headers, done["scan_id"])
    # Every pod of the namespace from now on runs until it is deleted.
    faults.add_fault("hang", namespace=namespace)
    running = (
        await client.post("/api/v1/scan/docker", json={"image": image}, headers=headers)
    ).json()

    async def job_exists() -> bool:
        jobs = await admin.list_jobs(
            namespace, label_selector=f"secapi.io/scan-id={running['scan_id']}"
        )
        return bool(jobs)

    await wait_for(job_exists, within=60, what="the second scan's Job")

    for scan_id in (done["scan_id"], running["scan_id"]):
        response = await client.delete(f"/api/v1/scans/{scan_id}", headers=headers)
        assert response.status_code == 204, response.text
        assert (await client.get(f"/api/v1/scans/{scan_id}", headers=headers)).status_code == 404
        assert query(database_url, "SELECT id FROM scans WHERE id = %s", scan_id) == []
        assert (
            await admin.list_scans(namespace, label_selector=f"secapi.io/scan-id={scan_id}") == []
        )

    async def jobs_gone() -> bool:
        jobs = await admin.list_jobs(
            namespace, label_selector="app.kubernetes.io/managed-by=secapi-operator"
        )
        return not [job for job in jobs if not job["metadata"].get("deletionTimestamp")]

    await wait_for(jobs_gone, within=60, what="the deleted scans' Jobs to go")


async def test_unreachable_api_server_answers_503(
    kubeconfig: Path,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    tmp_path: Path,
    api_client: ApiFactory,
    unused_tcp_port: int,
) -> None:
    # A kubeconfig whose server is a loopback port where nothing listens.
    dead = write_token_kubeconfig(
        kubeconfig,
        token="x" * 20,
        user="nobody",
        namespace=namespace,
        out=tmp_path / "dead.kubeconfig",
    )
    dead.write_text(
        dead.read_text().replace(_server_of(kubeconfig), f"https://127.0.0.1:{unused_tcp_port}")
    )
    client = await api_client(dead)
    headers = await register(client)

    response = await client.post(
        "/api/v1/scan/docker", json={"image": "alpine:3.19"}, headers=headers
    )
    assert response.status_code == 503, response.text

    rows = query(database_url, "SELECT status, reason FROM scans WHERE image = 'alpine:3.19'")
    assert rows == [("failed", "ExecutorUnavailable")]
    assert await admin.list_scans(namespace) == []


def _server_of(kubeconfig: Path) -> str:
    import yaml

    server: str = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    return server
