"""Scans through the REST API of a Kubernetes-mode deployment, checked against the Scan resources.

Every test talks to the API as a user would and reads Scan resources with
`kubectl get scans`; see conftest.py for where the deployment comes from.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.e2e.cluster.conftest import Deployment, ImageUnderTest

pytestmark = pytest.mark.cluster

FINAL = ("completed", "failed")
SUMMARY_KEYS = {
    "critical",
    "high",
    "medium",
    "low",
    "unknown",
    "total",
    "secrets",
    "misconfigurations",
}
SEVERITIES = {"CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"}


@dataclass(frozen=True)
class User:
    client: httpx.Client
    headers: dict[str, str]


@dataclass(frozen=True)
class FinishedScan:
    user: User
    scan_id: str
    body: dict[str, Any]


@pytest.fixture(scope="module")
def client(deployment: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment.base_url, timeout=30) as http:
        yield http


def register(client: httpx.Client) -> User:
    response = client.post(
        "/api/v1/auth/register", json={"email": f"e2e-{uuid.uuid4().hex[:12]}@example.com"}
    )
    assert response.status_code == 201, response.text
    key = response.json()["api_key"]
    assert key
    return User(client=client, headers={"X-API-Key": key})


def submit(user: User, image: str) -> str:
    response = user.client.post("/api/v1/scan/docker", json={"image": image}, headers=user.headers)
    assert response.status_code == 202, response.text
    scan_id: str = response.json()["scan_id"]
    return scan_id


def wait_for_end(deployment: Deployment, user: User, scan_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + deployment.scan_timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = user.client.get(f"/api/v1/scans/{scan_id}", headers=user.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in FINAL:
            return body
        time.sleep(1)
    raise AssertionError(
        f"scan {scan_id} did not end within {deployment.scan_timeout} s; last: {body}"
    )


def scan_resources(deployment: Deployment, scan_id: str) -> list[dict[str, Any]]:
    output = deployment.kubectl_json(
        "get", "scans", "-l", f"secapi.io/scan-id={scan_id}", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(output)["items"]
    return items


def wait_for_resource_phase(deployment: Deployment, scan_id: str, phase: str) -> dict[str, Any]:
    # The API reads the database row, and the operator may patch the Scan's status a moment later.
    deadline = time.monotonic() + 60
    items: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        items = scan_resources(deployment, scan_id)
        if len(items) == 1 and (items[0].get("status") or {}).get("phase") == phase:
            return items[0]
        time.sleep(1)
    raise AssertionError(f"no Scan with scan-id {scan_id} in phase {phase}; found: {items}")


@pytest.fixture(scope="module")
def finished_scan(
    deployment: Deployment, client: httpx.Client, scan_image: ImageUnderTest
) -> FinishedScan:
    """Return one user's scan of the fixture image after the scan has ended."""
    user = register(client)
    scan_id = submit(user, scan_image.reference)
    return FinishedScan(user=user, scan_id=scan_id, body=wait_for_end(deployment, user, scan_id))


def test_scan_completes_with_expected_findings(
    finished_scan: FinishedScan, scan_image: ImageUnderTest
) -> None:
    body = finished_scan.body
    assert body["status"] == "completed", body
    assert body["image"] == scan_image.reference
    assert body["reason"] is None
    results = body["results"]
    assert set(results["summary"]) >= SUMMARY_KEYS
    assert results["summary"] == body["summary"]
    assert results["trivy_version"]
    assert results["image_digest"].startswith("sha256:")
    vulnerabilities = results["vulnerabilities"]
    assert len(vulnerabilities) == results["summary"]["total"]
    for item in vulnerabilities:
        assert item["id"] and item["package"], item
        assert item["severity"] in SEVERITIES, item
    for severity in SEVERITIES:
        count = sum(1 for item in vulnerabilities if item["severity"] == severity)
        assert count == results["summary"][severity.lower()], severity
    if scan_image.expected_ids is not None:
        assert {item["id"] for item in vulnerabilities} == scan_image.expected_ids


def test_scan_resource_matches_api_summary(
    deployment: Deployment, finished_scan: FinishedScan
) -> None:
    resource = wait_for_resource_phase(deployment, finished_scan.scan_id, "Completed")
    status = resource["status"]
    assert status["scanId"] == finished_scan.scan_id
    summary = finished_scan.body["summary"]
    assert {key: status["summary"][key] for key in SUMMARY_KEYS} == {
        key: summary[key] for key in SUMMARY_KEYS
    }
    assert resource["spec"]["image"] == finished_scan.body["image"]


def test_missing_image_fails_with_image_not_found(
    deployment: Deployment, client: httpx.Client, missing_image: str
) -> None:
    user = register(client)
    scan_id = submit(user, missing_image)
    body = wait_for_end(deployment, user, scan_id)
    assert body["status"] == "failed", body
    assert body["reason"] == "ImageNotFound", body
    assert body["message"]
    assert body["results"] is None

    resource = wait_for_resource_phase(deployment, scan_id, "Failed")
    assert resource["status"]["reason"] == "ImageNotFound", resource["status"]


def test_other_user_gets_not_found(
    deployment: Deployment, client: httpx.Client, finished_scan: FinishedScan
) -> None:
    other = register(client)
    path = f"/api/v1/scans/{finished_scan.scan_id}"
    assert client.get(path, headers=other.headers).status_code == 404
    assert client.delete(path, headers=other.headers).status_code == 404
    listing = client.get("/api/v1/scans", headers=other.headers)
    assert listing.status_code == 200, listing.text
    assert finished_scan.scan_id not in {item["scan_id"] for item in listing.json()["items"]}

    # The owner still has it, and so does the cluster.
    assert client.get(path, headers=finished_scan.user.headers).status_code == 200
    assert len(scan_resources(deployment, finished_scan.scan_id)) == 1


def test_missing_key_is_rejected(client: httpx.Client) -> None:
    response = client.post("/api/v1/scan/docker", json={"image": "alpine:3.17"})
    assert response.status_code == 401, response.text
    response = client.get("/api/v1/scans", headers={"X-API-Key": "not-a-key"})
    assert response.status_code == 401, response.text


def test_delete_removes_scan_resource(
    deployment: Deployment, client: httpx.Client, scan_image: ImageUnderTest
) -> None:
    user = register(client)
    scan_id = submit(user, scan_image.reference)
    wait_for_end(deployment, user, scan_id)
    assert len(scan_resources(deployment, scan_id)) == 1

    response = client.delete(f"/api/v1/scans/{scan_id}", headers=user.headers)
    assert response.status_code == 204, response.text
    assert client.get(f"/api/v1/scans/{scan_id}", headers=user.headers).status_code == 404

    deadline = time.monotonic() + 60
    while scan_resources(deployment, scan_id):
        assert time.monotonic() < deadline, f"the Scan of {scan_id} is still there after 60 s"
        time.sleep(1)
