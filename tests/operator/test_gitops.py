"""Scans applied with kubectl, no API involved: the GitOps path end to end on the test bed.

Each test applies Scan manifests with the bed's real kubectl, runs `secapi
operator` under the operator's RBAC rules, and compares the outcome with
what the bed's Trivy reports for the same image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from secapi.core.executors.kube_client import KubeClient
from tests.operator.conftest import (
    OperatorFactory,
    kubectl,
    query,
    scan_manifest,
    trivy_report,
    wait_for,
    wait_for_phase,
)
from tests.testbed.bed import Testbed

pytestmark = pytest.mark.cluster


def trivy_counts(report: dict[str, Any]) -> dict[str, int]:
    counts = dict.fromkeys(("critical", "high", "medium", "low", "unknown"), 0)
    secrets = 0
    for result in report.get("Results") or []:
        for vulnerability in result.get("Vulnerabilities") or []:
            counts[vulnerability["Severity"].lower()] += 1
        secrets += len(result.get("Secrets") or [])
    return {**counts, "total": sum(counts.values()), "secrets": secrets}


def apply(testbed: Testbed, namespace: str, manifest: dict[str, Any]) -> str:
    return kubectl(
        testbed, "apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(manifest)
    )


async def test_applied_scan_completes_with_trivy_counts(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/alpine:3.17"
    await start_operator(namespace)
    apply(testbed, namespace, scan_manifest("alpine", image))

    scan = await wait_for_phase(admin, namespace, "alpine")
    status = scan["status"]
    expected = trivy_counts(trivy_report(testbed, image, "--scanners", "vuln,secret"))

    assert status["phase"] == "Completed", status
    for key, value in expected.items():
        assert status["summary"][key] == value, key
    assert status["imageDigest"].startswith("sha256:")
    assert status["trivyVersion"] == "0.74.0"
    assert status["observedGeneration"] == 1
    # The report stays in PostgreSQL: the whole Scan is a few KiB.
    assert len(json.dumps(scan)) < 8 * 1024

    rows = query(
        database_url,
        "SELECT s.status, s.critical, s.high, s.medium, s.low, u.kind, s.k8s_uid "
        "FROM scans s JOIN users u ON u.id = s.user_id WHERE s.id = %s",
        status["scanId"],
    )
    assert rows == [
        (
            "completed",
            expected["critical"],
            expected["high"],
            expected["medium"],
            expected["low"],
            "cluster",
            scan["metadata"]["uid"],
        )
    ]
    [(findings,)] = query(
        database_url, "SELECT count(*) FROM findings WHERE scan_id = %s", status["scanId"]
    )
    assert findings == expected["total"] + expected["secrets"]

    # The Job is gone once the result is stored, and Kopf left no marks on the Scan.
    jobs = await admin.list_jobs(
        namespace, label_selector="app.kubernetes.io/managed-by=secapi-operator"
    )
    assert jobs == []
    assert not scan["metadata"].get("finalizers")
    for key in scan["metadata"].get("annotations") or {}:
        assert not key.startswith("kopf."), key


async def test_reapply_does_not_rescan_but_spec_change_does(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/debian:12"
    await start_operator(namespace)
    manifest = scan_manifest("debian", image)
    apply(testbed, namespace, manifest)
    first = await wait_for_phase(admin, namespace, "debian")
    assert first["status"]["phase"] == "Completed"

    # The same manifest again: nothing changes, so no new scan starts.
    assert "unchanged" in apply(testbed, namespace, manifest)
    second = await admin.get_scan(namespace, "debian")
    assert second is not None
    assert second["metadata"]["generation"] == 1
    assert second["status"]["scanId"] == first["status"]["scanId"]
    [(count,)] = query(
        database_url, "SELECT count(*) FROM scans WHERE k8s_uid = %s", first["metadata"]["uid"]
    )
    assert count == 1

    # A changed spec is a new scan of its own.
    apply(testbed, namespace, scan_manifest("debian", image, severities=["HIGH", "CRITICAL"]))

    async def rescanned() -> dict[str, Any] | None:
        body = await admin.get_scan(namespace, "debian")
        status = (body or {}).get("status") or {}
        if status.get("observedGeneration") == 2 and status.get("phase") in ("Completed", "Failed"):
            return body
        return None

    third = await wait_for(rescanned, within=180, what="generation 2 to finish")
    expected = trivy_counts(
        trivy_report(testbed, image, "--scanners", "vuln,secret", "--severity", "HIGH,CRITICAL")
    )
    assert third["status"]["phase"] == "Completed"
    assert third["status"]["scanId"] != first["status"]["scanId"]
    assert third["status"]["summary"]["high"] == expected["high"]
    assert third["status"]["summary"]["low"] == 0
    rows = query(
        database_url,
        "SELECT k8s_generation, status FROM scans WHERE k8s_uid = %s ORDER BY k8s_generation",
        first["metadata"]["uid"],
    )
    assert rows == [(1, "completed"), (2, "completed")]


async def test_kubectl_get_scans_shows_phase_and_counts(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    start_operator: OperatorFactory,
) -> None:
    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/app:1.0"
    await start_operator(namespace)
    apply(testbed, namespace, scan_manifest("app", image))
    scan = await wait_for_phase(admin, namespace, "app")
    summary = scan["status"]["summary"]

    table = kubectl(testbed, "get", "scans", "-n", namespace)
    [row] = parse_table(table)
    assert list(row) == ["NAME", "IMAGE", "PHASE", "CRITICAL", "HIGH", "AGE"]
    assert row["NAME"] == "app"
    assert row["IMAGE"] == image
    assert row["PHASE"] == "Completed"
    assert row["CRITICAL"] == str(summary["critical"])
    assert row["HIGH"] == str(summary["high"])

    [wide] = parse_table(kubectl(testbed, "get", "scan", "app", "-n", namespace, "-o", "wide"))
    assert list(wide) == [
        "NAME",
        "IMAGE",
        "PHASE",
        "CRITICAL",
        "HIGH",
        "MEDIUM",
        "LOW",
        "DIGEST",
        "REASON",
        "AGE",
    ]
    assert wide["MEDIUM"] == str(summary["medium"])
    assert wide["LOW"] == str(summary["low"])
    assert wide["DIGEST"] == scan["status"]["imageDigest"]
    assert wide["REASON"] in ("", "<none>")


def parse_table(text: str) -> list[dict[str, str]]:
    """Split kubectl's table output into rows by the header's column positions."""
    header, *lines = text.rstrip("\n").splitlines()
    columns = list(re.finditer(r"\S+", header))
    names = [column.group() for column in columns]
    starts = [column.start() for column in columns]
    ends = [*starts[1:], None]
    return [
        {
            name: line[start:end].strip()
            for name, start, end in zip(names, starts, ends, strict=True)
        }
        for line in lines
    ]


async def test_many_findings_round_trip_with_small_status(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    database_url: str,
    start_operator: OperatorFactory,
) -> None:
    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/many-findings:1.0"
    await start_operator(namespace)
    apply(testbed, namespace, scan_manifest("many", image))
    scan = await wait_for_phase(admin, namespace, "many", within=300)
    expected = trivy_counts(trivy_report(testbed, image, "--scanners", "vuln,secret"))

    assert scan["status"]["phase"] == "Completed", scan["status"]
    assert expected["total"] >= 3000
    assert scan["status"]["summary"]["total"] == expected["total"]
    assert len(json.dumps(scan).encode()) < 100 * 1024
    [(findings,)] = query(
        database_url,
        "SELECT count(*) FROM findings WHERE scan_id = %s AND kind = 'vulnerability'",
        scan["status"]["scanId"],
    )
    assert findings == expected["total"]


async def test_scans_run_in_restricted_namespace(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    start_operator: OperatorFactory,
) -> None:
    kubectl(
        testbed,
        "label",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    # The API server itself checks the profile: a pod without hardening is rejected.
    with pytest.raises(AssertionError, match="violates PodSecurity"):
        kubectl(
            testbed,
            "run",
            "unhardened",
            "-n",
            namespace,
            "--image=scanner.invalid/x:1",
            "--restart=Never",
            "--command",
            "--",
            "true",
        )

    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/secret:1.0"
    await start_operator(namespace)
    apply(testbed, namespace, scan_manifest("secret", image))
    scan = await wait_for_phase(admin, namespace, "secret")

    expected = trivy_counts(trivy_report(testbed, image, "--scanners", "vuln,secret"))
    assert scan["status"]["phase"] == "Completed", scan["status"]
    assert expected["secrets"] > 0
    assert scan["status"]["summary"]["secrets"] == expected["secrets"]


async def test_scan_deletable_without_operator(
    testbed: Testbed, admin: KubeClient, namespace: str, tmp_path: Path
) -> None:
    # No operator runs: nothing may block the deletion.
    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/alpine:3.17"
    apply(testbed, namespace, scan_manifest("orphan", image))
    kubectl(testbed, "delete", "scan", "orphan", "-n", namespace, "--timeout=20s")
    assert await admin.get_scan(namespace, "orphan") is None


async def test_state_changes_post_events(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    start_operator: OperatorFactory,
) -> None:
    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/alpine:3.17"
    await start_operator(namespace)
    apply(testbed, namespace, scan_manifest("events", image))
    scan = await wait_for_phase(admin, namespace, "events")

    async def reasons() -> list[str] | None:
        answer = await admin.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/events",
            query={"fieldSelector": f"involvedObject.uid={scan['metadata']['uid']}"},
        )
        found = [event["reason"] for event in answer.get("items", [])]
        return found if "Completed" in found else None

    found = await wait_for(reasons, within=30, what="the Scan's events")
    assert "Queued" in found
    assert "Started" in found
    described = kubectl(testbed, "describe", "scan", "events", "-n", namespace)
    assert "Completed" in described


async def test_leftover_job_of_finished_scan_is_deleted(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    start_operator: OperatorFactory,
) -> None:
    image = f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/alpine:3.17"
    await start_operator(namespace)
    apply(testbed, namespace, scan_manifest("tidy", image))
    scan = await wait_for_phase(admin, namespace, "tidy")
    assert scan["status"]["phase"] == "Completed"

    # A Job of this Scan that should not exist, as a crashed operator could leave behind.
    from secapi.core.settings import KubernetesSettings
    from secapi.operator.jobs import ScanJobSource, build_job

    leftover = build_job(
        ScanJobSource(
            name="tidy",
            namespace=namespace,
            uid=scan["metadata"]["uid"],
            generation=7,
            scan_id=scan["status"]["scanId"],
            image=image,
            timeout_seconds=60,
        ),
        KubernetesSettings(),
    )
    leftover["spec"]["template"]["metadata"]["annotations"] = {"testbed.secapi.io/fault": "hang"}
    await admin.create_job(namespace, leftover)

    async def gone() -> bool:
        return await admin.get_job(namespace, leftover["metadata"]["name"]) is None

    await wait_for(gone, within=30, what="the leftover Job to be deleted")


async def test_database_outage_keeps_scan_pending_then_fails(
    testbed: Testbed,
    admin: KubeClient,
    namespace: str,
    start_operator: OperatorFactory,
    unused_tcp_port: int,
) -> None:
    dead_database = f"postgresql://secapi:unused@127.0.0.1:{unused_tcp_port}/secapi"
    await start_operator(
        namespace, DATABASE_URL=dead_database, SECAPI_SCANNER__QUEUE_TIMEOUT_SECONDS="10"
    )
    apply(
        testbed,
        namespace,
        scan_manifest("nodb", f"{testbed.env['SECAPI_TEST_REGISTRY']}/fixtures/alpine:3.17"),
    )

    pending = await wait_for_phase(admin, namespace, "nodb", ("Pending",), within=60)
    assert pending["status"]["reason"] == "DatabaseUnavailable"
    assert "observedGeneration" not in pending["status"]

    failed = await wait_for_phase(admin, namespace, "nodb", ("Failed",), within=60)
    assert failed["status"]["reason"] == "DatabaseUnavailable"
    assert "unused" not in failed["status"]["message"]
    assert (
        await admin.list_jobs(
            namespace, label_selector="app.kubernetes.io/managed-by=secapi-operator"
        )
        == []
    )
