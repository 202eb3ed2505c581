"""The bare app's baselines: the endpoint that stores submissions and the Trivy runner.

A baseline that silently did less than it claims would make SecAPI look slow,
and one that failed would stop `make bench` halfway, so both are checked here
against real processes, PostgreSQL and kube-apiserver.
"""

from __future__ import annotations

import sys

import httpx
import psycopg
import pytest

from bench.bare_app import (
    IMAGE_PLACEHOLDER,
    OUTPUT_PLACEHOLDER,
    STORED_PREFIX,
    TRIVY_PREFIX,
    create_app,
    create_stored_table,
)
from bench.bed import Bed, scratch_database
from bench.cluster import Cluster
from tests.testbed.bed import Testbed
from tests.testbed.paths import bed_paths

# A made-up reference on the loopback interface: no test here pulls it.
IMAGE = "127.0.0.1:5000/fixtures/app:1.0"
# Writes the image reference into the report file, as a stand-in for Trivy.
WRITE_REPORT = "import sys; open(sys.argv[2], 'w').write(sys.argv[1])"


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bare")


async def test_trivy_runner_waits_for_the_command() -> None:
    command = [sys.executable, "-c", WRITE_REPORT, IMAGE_PLACEHOLDER, OUTPUT_PLACEHOLDER]
    app = create_app(b"{}", trivy_command=command)

    async with _client(app) as client:
        submitted = await client.post(f"{TRIVY_PREFIX}/api/v1/scan/docker", json={"image": IMAGE})
        assert submitted.status_code == 202, submitted.text
        scan_id = submitted.json()["scan_id"]
        finished = await client.get(f"{TRIVY_PREFIX}/api/v1/scans/{scan_id}", params={"wait": 30})
        repeated = await client.get(f"{TRIVY_PREFIX}/api/v1/scans/{scan_id}")

    body = finished.json()
    assert body["status"] == "completed"
    assert body["report_bytes"] == len(IMAGE)
    assert body["completed_at"] >= body["created_at"]
    # A run is forgotten once its end was reported.
    assert repeated.status_code == 404


async def test_trivy_runner_reports_a_failed_command() -> None:
    app = create_app(b"{}", trivy_command=[sys.executable, "-c", "raise SystemExit(3)"])

    async with _client(app) as client:
        submitted = await client.post(f"{TRIVY_PREFIX}/api/v1/scan/docker", json={"image": IMAGE})
        scan_id = submitted.json()["scan_id"]
        finished = await client.get(f"{TRIVY_PREFIX}/api/v1/scans/{scan_id}", params={"wait": 30})

    assert finished.json()["status"] == "failed"


async def test_stored_submit_writes_row_and_resource(
    testbed: Testbed, monkeypatch: pytest.MonkeyPatch
) -> None:
    bed = Bed(paths=bed_paths(), env=testbed.env)
    monkeypatch.setenv("KUBECONFIG", str(bed.kubeconfig))
    cluster = Cluster(bed.kubeconfig)
    try:
        cluster.ensure_crd()
        with (
            scratch_database(bed, "secapi_bench_test_stored") as url,
            cluster.namespace("secapi-bench-test") as namespace,
        ):
            database_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
            create_stored_table(database_url)
            app = create_app(b"{}", database_url=database_url, namespace=namespace)
            async with app.router.lifespan_context(app), _client(app) as client:
                submitted = await client.post(
                    f"{STORED_PREFIX}/api/v1/scan/docker", json={"image": IMAGE}
                )

            assert submitted.status_code == 202, submitted.text
            scan_id = submitted.json()["scan_id"]
            with psycopg.connect(url) as connection:
                rows = connection.execute("SELECT id, image, status FROM bare_scans").fetchall()
            assert rows == [(scan_id, IMAGE, "pending")]
            resources = cluster.list_scans(namespace)
            assert [item["metadata"]["name"] for item in resources] == [f"bare-{scan_id}"]
            assert resources[0]["spec"]["image"] == IMAGE
    finally:
        cluster.close()
