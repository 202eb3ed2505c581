"""The embedded stack over HTTP: a real `secapi serve` process, its local executor and Trivy.

Each test starts `secapi serve` as a subprocess on a loopback port, against
PostgreSQL and against SQLite, scans the bed's fixture images and compares
what the API returns with what `trivy image --format json` reports for the
same image and DB.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from secapi.core.scans.options import ScanOptions
from secapi.core.settings import Settings
from tests.api.conftest import SECAPI, server_environment

# Fixtures shared with the scan tests: the bed's Trivy and registry, databases, settings.
from tests.scans.conftest import (  # noqa: F401
    ReportFactory,
    database,
    make_settings,
    registry,
    trivy_bin,
    trivy_cache,
    trivy_report,
)
from tests.scans.servers import push_files_image, silent_server
from tests.scans.test_report import MISCONFIG_FILES
from tests.testbed.fixture_images import load_catalog

FINAL = ("completed", "failed")
# Tier limits that never get in the way of these tests.
GENEROUS_LIMITS = {
    "RATE_LIMIT_ENABLED": "false",
    "SECAPI_TIERS__FREE__CONCURRENT_SCANS": "1000",
    "SECAPI_TIERS__FREE__SCANS_PER_HOUR": "100000",
    "SECAPI_TIERS__FREE__REQUESTS_PER_MINUTE": "100000",
}


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen[bytes]
    url: str


def start(settings: Settings, log_path: Path, **extra_env: str) -> Server:
    """Start `secapi serve` on a free loopback port and wait until /health returns 200."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**server_environment(settings), **GENEROUS_LIMITS, **extra_env}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [SECAPI, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(process=process, url=f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise AssertionError(f"secapi serve exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop(server)
            raise AssertionError(f"secapi serve did not answer: {log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)


@contextmanager
def serve(settings: Settings, log_path: Path, **extra_env: str) -> Iterator[Server]:
    """Run `secapi serve` until the block ends."""
    server = start(settings, log_path, **extra_env)
    try:
        yield server
    finally:
        stop(server)


async def register(client: httpx.AsyncClient) -> dict[str, str]:
    email = f"e2e-{os.urandom(5).hex()}@example.com"
    response = await client.post("/api/v1/auth/register", json={"email": email})
    assert response.status_code == 201, response.text
    return {"X-API-Key": response.json()["api_key"]}


async def submit(
    client: httpx.AsyncClient, headers: dict[str, str], image: str, **options: Any
) -> str:
    response = await client.post(
        "/api/v1/scan/docker", json={"image": image, **options}, headers=headers
    )
    assert response.status_code == 202, response.text
    return str(response.json()["scan_id"])


async def wait_final(
    client: httpx.AsyncClient, headers: dict[str, str], scan_id: str, *, within: float = 300
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        response = await client.get(
            f"/api/v1/scans/{scan_id}?include_findings=false", headers=headers
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in FINAL:
            return body
        assert time.monotonic() < deadline, f"scan {scan_id} still {body['status']}"
        await asyncio.sleep(0.3)


def trivy_vulnerabilities(path: Path) -> set[tuple[str, str, str]]:
    data = json.loads(path.read_text())
    return {
        (item["VulnerabilityID"], item["PkgName"], item["InstalledVersion"])
        for result in data.get("Results") or []
        for item in result.get("Vulnerabilities") or []
    }


def fixture_scans() -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """Return each fixture image with its scan options and the OS the catalog expects."""
    scans = []
    for entry in load_catalog():
        if entry["kind"] == "image":
            scans.append((f"{entry['name']}:{entry['tag']}", {}, entry["expect"]["os"]))
        elif entry["kind"] == "index":
            for platform in entry["platforms"]:
                scans.append(
                    (
                        f"{entry['name']}:{entry['tag']}",
                        {"platform": platform["platform"]},
                        platform["expect"]["os"],
                    )
                )
    return scans


async def test_fixture_images_match_trivy(
    registry: str,  # noqa: F811
    make_settings: Callable[..., Settings],  # noqa: F811
    trivy_report: ReportFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = make_settings()
    with serve(settings, tmp_path / "serve.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            headers = await register(client)
            submitted = [
                (
                    image,
                    options,
                    os_info,
                    await submit(client, headers, f"{registry}/{image}", **options),
                )
                for image, options, os_info in fixture_scans()
            ]
            for image, options, os_info, scan_id in submitted:
                short = await wait_final(client, headers, scan_id)
                response = await client.get(f"/api/v1/scans/{scan_id}", headers=headers)
                assert response.status_code == 200
                body = response.json()

                assert body["status"] == "completed", (image, body["reason"], body["message"])
                expected = trivy_vulnerabilities(
                    trivy_report(f"{registry}/{image}", options=ScanOptions(**options))
                )
                stored = {
                    (v["id"], v["package"], v["installed_version"])
                    for v in body["results"]["vulnerabilities"]
                }
                assert stored == expected, image
                assert body["results"]["trivy_version"] == "0.74.0"
                assert body["queue_position"] is None
                # The OS, with Trivy's end-of-life flag, in both views of the scan.
                assert body["results"]["os"] == os_info, image
                assert short["results"]["os"] == os_info, image


async def all_pages(
    client: httpx.AsyncClient, headers: dict[str, str], url: str, *, page_size: int
) -> list[dict[str, Any]]:
    """Read every page of a finding endpoint, checking each page's counts on the way."""
    items: list[dict[str, Any]] = []
    page = 1
    while True:
        response = await client.get(
            url, params={"page": page, "page_size": page_size}, headers=headers
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["page"], body["page_size"]) == (page, page_size)
        if not body["items"]:
            assert len(items) == body["total"]
            return items
        assert len(body["items"]) <= page_size
        items.extend(body["items"])
        page += 1


def trivy_licenses(path: Path) -> list[tuple[str, str | None, str | None, str]]:
    return [
        (item["Name"], item["PkgName"] or None, item["FilePath"] or None, item["Severity"])
        for result in json.loads(path.read_text()).get("Results") or []
        for item in result.get("Licenses") or []
    ]


async def test_licenses_over_http(
    registry: str,  # noqa: F811
    make_settings: Callable[..., Settings],  # noqa: F811
    trivy_report: ReportFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    image = f"{registry}/fixtures/app:1.0"
    scanners = ["vuln", "license"]
    expected = trivy_licenses(trivy_report(image, options=ScanOptions(scanners=scanners)))
    assert len(expected) == 9

    with serve(make_settings(), tmp_path / "serve.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            owner = await register(client)
            other = await register(client)
            scan_id = await submit(client, owner, image, scanners=scanners)
            short = await wait_final(client, owner, scan_id)
            full = (await client.get(f"/api/v1/scans/{scan_id}", headers=owner)).json()
            url = f"/api/v1/scans/{scan_id}/licenses"
            paged = await all_pages(client, owner, url, page_size=4)
            low = (await client.get(url, params={"severity": "LOW"}, headers=owner)).json()
            high = (await client.get(url, params={"severity": "HIGH"}, headers=owner)).json()
            foreign = await client.get(url, headers=other)
            missing = await client.get("/api/v1/scans/no-such-scan/licenses", headers=owner)

    assert short["status"] == "completed", short["message"]
    assert short["summary"]["licenses"] == 9
    assert short["summary"]["total"] == 15
    assert short["results"]["summary"]["licenses"] == 9
    assert "licenses" not in short["results"]
    assert full["summary"]["licenses"] == 9
    assert full["results"]["summary"]["licenses"] == 9
    licenses = full["results"]["licenses"]
    assert [
        (item["name"], item["package"], item["package_path"], item["severity"]) for item in licenses
    ] == expected
    assert paged == licenses
    assert {item["target"] for item in paged} == {"Node.js", "Python"}
    assert {item["category"] for item in paged} == {"notice"}
    assert {item["confidence"] for item in paged} == {1.0}
    assert low["total"] == 9
    assert high["total"] == 0
    # Another user's scan is not found, exactly like a scan that does not exist.
    assert foreign.status_code == 404
    assert missing.status_code == 404
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"]


async def test_misconfigurations_over_http(
    registry: str,  # noqa: F811
    make_settings: Callable[..., Settings],  # noqa: F811
    trivy_report: ReportFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    image = f"{registry}/scan-tests/e2e-misconfig:1"
    push_files_image(MISCONFIG_FILES, work=tmp_path / "image", destination=image)
    raw = json.loads(trivy_report(image, options=ScanOptions(scanners=["misconfig"])).read_text())
    expected = [
        (item["ID"], result["Target"], item["Severity"])
        for result in raw["Results"]
        for item in result.get("Misconfigurations") or []
    ]
    assert expected

    with serve(make_settings(), tmp_path / "serve.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            headers = await register(client)
            scan_id = await submit(client, headers, image, scanners=["misconfig"])
            body = await wait_final(client, headers, scan_id)
            full = (await client.get(f"/api/v1/scans/{scan_id}", headers=headers)).json()
            paged = await all_pages(
                client, headers, f"/api/v1/scans/{scan_id}/misconfigurations", page_size=10
            )

    assert body["status"] == "completed", body["message"]
    assert body["summary"]["misconfigurations"] == len(expected)
    stored = [
        (item["id"], item["target"], item["severity"])
        for item in full["results"]["misconfigurations"]
    ]
    assert stored == expected
    assert paged == full["results"]["misconfigurations"]
    assert {item["target"] for item in paged} == {"app/Dockerfile", "deploy/pod.yaml"}


async def test_missing_image_fails_over_http(
    registry: str,  # noqa: F811
    make_settings: Callable[..., Settings],  # noqa: F811
    tmp_path: Path,
) -> None:
    with serve(make_settings(), tmp_path / "serve.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            headers = await register(client)
            scan_id = await submit(client, headers, f"{registry}/fixtures/alpine:no-such-tag")
            body = await wait_final(client, headers, scan_id, within=60)

    assert body["status"] == "failed"
    assert body["reason"] == "ImageNotFound"
    assert "MANIFEST_UNKNOWN" in body["message"]
    assert body["results"] is None


async def test_artifact_fails_over_http(
    registry: str,  # noqa: F811
    make_settings: Callable[..., Settings],  # noqa: F811
    tmp_path: Path,
) -> None:
    with serve(make_settings(), tmp_path / "serve.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            headers = await register(client)
            scan_id = await submit(client, headers, f"{registry}/fixtures/artifact:1.0")
            body = await wait_final(client, headers, scan_id, within=60)

    assert body["status"] == "failed"
    assert body["reason"] == "ScannerError"
    assert body["message"].startswith(
        "the reference points to an OCI artifact of type application/vnd.secapi.fixture.notes.v1, "
        "not a container image; SecAPI scans container images"
    )
    assert 'unsupported artifact type "application/vnd.secapi.fixture.notes.v1"' in body["message"]
    assert body["results"] is None


async def test_large_scan_pages_over_http(
    registry: str,  # noqa: F811
    make_settings: Callable[..., Settings],  # noqa: F811
    tmp_path: Path,
) -> None:
    with serve(make_settings(), tmp_path / "serve.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            headers = await register(client)
            scan_id = await submit(client, headers, f"{registry}/fixtures/many-findings:1.0")
            body = await wait_final(client, headers, scan_id)
            assert body["status"] == "completed", body["message"]

            seen: list[tuple[str, str, str]] = []
            paths: list[str] = []
            page = 1
            while True:
                response = await client.get(
                    f"/api/v1/scans/{scan_id}/vulnerabilities",
                    params={"page": page, "page_size": 100},
                    headers=headers,
                )
                assert response.status_code == 200
                items = response.json()["items"]
                assert response.json()["total"] == 3200
                if not items:
                    break
                seen.extend((v["id"], v["package"], v["installed_version"]) for v in items)
                paths.extend(v["package_path"] for v in items)
                page += 1
            full = await client.get(f"/api/v1/scans/{scan_id}", headers=headers)

    assert page == 33
    document = full.json()["results"]["vulnerabilities"]
    assert body["summary"]["total"] == 3200
    assert len(seen) == 3200
    # Pages come in report order, the order of the stored document.
    assert seen == [(v["id"], v["package"], v["installed_version"]) for v in document]
    # Every finding says which of the 160 copies of the app it belongs to.
    assert paths == [v["package_path"] for v in document]
    folders = [path.split("/node_modules/")[0] for path in paths]
    assert {folder: folders.count(folder) for folder in set(folders)} == {
        f"srv/app-{index:03d}": 20 for index in range(1, 161)
    }


async def test_twenty_concurrent_submissions_over_http(
    registry: str,  # noqa: F811
    make_settings: Callable[..., Settings],  # noqa: F811
    tmp_path: Path,
) -> None:
    with serve(make_settings(), tmp_path / "serve.log") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            headers = await register(client)
            images = [f"{registry}/fixtures/alpine:3.17", f"{registry}/fixtures/debian:12"]
            scan_ids = await asyncio.gather(
                *(submit(client, headers, images[n % 2]) for n in range(20))
            )
            bodies = [await wait_final(client, headers, scan_id) for scan_id in scan_ids]

    assert len(set(scan_ids)) == 20
    assert [body["status"] for body in bodies] == ["completed"] * 20, [b["message"] for b in bodies]


async def test_killed_server_loses_no_scans(
    registry: str,  # noqa: F811
    make_settings: Callable[..., Settings],  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = make_settings(scanner={"max_concurrent_scans": 1})
    log_path = tmp_path / "serve.log"
    images = [f"{registry}/fixtures/many-findings:1.0", f"{registry}/fixtures/alpine:3.17"]

    first = start(settings, log_path)
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=60) as client:
            headers = await register(client)
            scan_ids = [await submit(client, headers, images[n % 2]) for n in range(6)]
            # Kill it while one scan runs and the rest wait in the queue.
            deadline = time.monotonic() + 60
            trivy_children: list[psutil.Process] = []
            while not trivy_children:
                trivy_children = [
                    child
                    for child in psutil.Process(first.process.pid).children(recursive=True)
                    if "trivy" in child.name()
                ]
                assert time.monotonic() < deadline, "no trivy process started"
                await asyncio.sleep(0.05)
            statuses = [
                (
                    await client.get(
                        f"/api/v1/scans/{scan_id}?include_findings=false", headers=headers
                    )
                ).json()["status"]
                for scan_id in scan_ids
            ]
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
    finally:
        stop(first)

    assert statuses.count("pending") >= 4, statuses
    # The Trivy processes of the killed server die with it.
    _, alive = psutil.wait_procs(trivy_children, timeout=10)
    assert not alive, [child.pid for child in alive]

    with serve(settings, log_path) as second:
        async with httpx.AsyncClient(base_url=second.url, timeout=60) as client:
            bodies = [await wait_final(client, headers, scan_id) for scan_id in scan_ids]

    assert [body["status"] for body in bodies] == ["completed"] * 6, [b["message"] for b in bodies]
    assert [body["summary"]["total"] for body in bodies] == [3200, 12] * 3


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_stop_signal_ends_long_polls(
    stop_signal: signal.Signals,
    make_settings: Callable[..., Settings],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A stopping server returns a long poll with the scan's state instead of waiting for it."""
    settings = make_settings(scanner={"timeout_seconds": 120})
    with silent_server() as address:
        server = start(settings, tmp_path / "serve.log")
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=90) as client:
                headers = await register(client)
                # Trivy waits for a registry that never responds, so the scan stays running.
                scan_id = await submit(client, headers, f"{address}/hangs:1")
                polling = asyncio.create_task(
                    client.get(
                        f"/api/v1/scans/{scan_id}?include_findings=false&wait=60",
                        headers=headers,
                    )
                )
                await asyncio.sleep(1)
                assert not polling.done()

                signalled = time.monotonic()
                server.process.send_signal(stop_signal)
                response = await asyncio.wait_for(polling, timeout=30)
                answered_after = time.monotonic() - signalled
            server.process.wait(timeout=30)
        finally:
            stop(server)

    assert response.status_code == 200, response.text
    assert response.json()["status"] in ("pending", "running")
    # Far less than the 60 s the request asked for.
    assert answered_after < 15
    assert "api stopped" in (tmp_path / "serve.log").read_text()
