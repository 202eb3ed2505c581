"""The fixture DB and images are real: Trivy v0.74.0 reports exactly what the catalog lists.

Every scan runs the bed's Trivy offline against the bed's registry and the
fixture DB built from tests/testbed/advisories/, with the flags SecAPI's own
scans use. A change to an advisory, a rootfs file or Trivy itself that shifts
a finding fails here first.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.bed import Testbed
from tests.testbed.fixture_images import load_catalog, publish_images, reference
from tests.testbed.trivy_db import TrivyDbError, build_trivy_cache

OFFLINE_FLAGS = [
    "--skip-db-update",
    "--skip-java-db-update",
    "--skip-version-check",
    "--disable-telemetry",
    "--image-src",
    "remote",
    "--insecure",
    "--cache-backend",
    "memory",
]
SCAN_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class FixtureBed:
    """The parts of the test bed these tests use."""

    registry: str
    trivy: Path
    cache: Path
    work_dir: Path


@dataclass(frozen=True)
class ScanCase:
    """One scan the catalog describes: an image, or one platform of an index."""

    ref: str
    scan_args: list[str]
    expect: dict[str, Any]


@dataclass(frozen=True)
class ScanOutcome:
    returncode: int
    report: dict[str, Any] | None
    stderr: str


Scan = Callable[..., ScanOutcome]


def _scan_cases() -> list[ScanCase]:
    cases = []
    for entry in load_catalog():
        if entry["kind"] == "image":
            cases.append(ScanCase(reference(entry), entry.get("scan", []), entry["expect"]))
        elif entry["kind"] == "index":
            for platform in entry["platforms"]:
                cases.append(ScanCase(reference(entry), platform["scan"], platform["expect"]))
    return cases


SCAN_CASES = _scan_cases()


@pytest.fixture(scope="module")
def fixture_bed(testbed: Testbed) -> FixtureBed:
    return FixtureBed(
        registry=testbed.registry,
        trivy=Path(testbed.env["TRIVY_BIN"]),
        cache=Path(testbed.env["SECAPI_TEST_TRIVY_CACHE"]),
        work_dir=testbed.paths.data / "images",
    )


@pytest.fixture(scope="module")
def scan(fixture_bed: FixtureBed) -> Scan:
    def run(ref: str, *extra: str, cache: Path | None = None) -> ScanOutcome:
        command = [
            str(fixture_bed.trivy),
            "image",
            *OFFLINE_FLAGS,
            "--cache-dir",
            str(cache or fixture_bed.cache),
            "--format",
            "json",
            *extra,
            f"{fixture_bed.registry}/{ref}",
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=SCAN_TIMEOUT_SECONDS, check=False
        )
        report = json.loads(result.stdout) if result.returncode == 0 else None
        return ScanOutcome(result.returncode, report, result.stderr)

    return run


def _vulnerabilities(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        vulnerability
        for result in report.get("Results", [])
        for vulnerability in result.get("Vulnerabilities") or []
    ]


def _secrets(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {**secret, "Target": result["Target"]}
        for result in report.get("Results", [])
        for secret in result.get("Secrets") or []
    ]


def _os(report: dict[str, Any]) -> dict[str, Any] | None:
    detected = report["Metadata"].get("OS")
    if detected is None:
        return None
    return {
        "family": detected["Family"],
        "name": detected["Name"],
        "eosl": detected.get("EOSL", False),
    }


@pytest.mark.parametrize(
    "case", SCAN_CASES, ids=[f"{case.ref}{''.join(case.scan_args)}" for case in SCAN_CASES]
)
def test_scan_matches_catalog(scan: Scan, case: ScanCase) -> None:
    outcome = scan(case.ref, *case.scan_args)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.report is not None
    expect = case.expect
    found = _vulnerabilities(outcome.report)

    assert _os(outcome.report) == expect["os"]
    assert len(found) == expect["vulnerability_count"]

    if "vulnerabilities" in expect:
        reported = Counter(
            (
                v["VulnerabilityID"],
                v["PkgName"],
                v["InstalledVersion"],
                v.get("FixedVersion", ""),
                v["Severity"],
                v["Status"],
            )
            for v in found
        )
        expected = Counter(
            (e["id"], e["package"], e["installed"], e["fixed"], e["severity"], e["status"])
            for e in expect["vulnerabilities"]
        )
        assert reported == expected

    if "distinct_vulnerabilities" in expect:
        # One copy's findings, each repeated once per copy of the app.
        per_key = Counter(
            (v["VulnerabilityID"], v["PkgName"], v["InstalledVersion"]) for v in found
        )
        expected_keys = {
            (e["id"], e["package"], e["installed"]) for e in expect["distinct_vulnerabilities"]
        }
        assert set(per_key) == expected_keys
        assert set(per_key.values()) == {expect["copies"]}

    reported_secrets = sorted(
        (s["RuleID"], s["Target"], s["StartLine"], s["Severity"]) for s in _secrets(outcome.report)
    )
    expected_secrets = sorted(
        (s["rule_id"], s["target"], s["line"], s["severity"]) for s in expect["secrets"]
    )
    assert reported_secrets == expected_secrets


def test_vulnerability_details_come_from_advisory(scan: Scan) -> None:
    outcome = scan("fixtures/app:1.0")
    assert outcome.report is not None
    by_id = {v["VulnerabilityID"]: v for v in _vulnerabilities(outcome.report)}
    finding = by_id["CVE-2023-32681"]

    assert finding["Title"].startswith("requests: Proxy-Authorization header")
    assert finding["CVSS"]["nvd"]["V3Score"] == 6.1
    assert finding["PublishedDate"] == "2023-05-26T18:15:00Z"
    assert "https://github.com/advisories/GHSA-j8r2-6x86-q33q" in finding["References"]
    assert finding["VendorIDs"] == ["GHSA-j8r2-6x86-q33q"]
    assert finding["DataSource"]["Name"] == "GitHub Security Advisory pip"
    assert finding["SeveritySource"] == "ghsa"


def test_artifact_scan_fails_with_reason(scan: Scan) -> None:
    (entry,) = [entry for entry in load_catalog() if entry["kind"] == "artifact"]
    outcome = scan(reference(entry))

    assert outcome.returncode != 0
    assert outcome.report is None
    assert entry["expect"]["error"] in outcome.stderr


def test_fixture_db_metadata_is_fresh(fixture_bed: FixtureBed) -> None:
    metadata = json.loads((fixture_bed.cache / "db" / "metadata.json").read_text())
    next_update = datetime.fromisoformat(metadata["NextUpdate"])

    assert metadata["Version"] == 2
    assert next_update > datetime.now(UTC) + timedelta(days=365 * 50)
    assert (fixture_bed.cache / "db" / "trivy.db").stat().st_size > 0


def test_custom_advisories_replace_fixture_db(scan: Scan, tmp_path: Path) -> None:
    advisories = tmp_path / "advisories"
    advisories.mkdir()
    (advisories / "one.yaml").write_text(
        "id: CVE-2023-0286\n"
        "title: a single advisory\n"
        "severity: CRITICAL\n"
        "affected:\n"
        "  - {ecosystem: alpine, release: '3.17', package: openssl, fixed_version: 3.0.8-r0}\n"
    )
    cache = build_trivy_cache(advisories, tmp_path / "cache")

    outcome = scan("fixtures/alpine:3.17", cache=cache)
    assert outcome.report is not None
    found = sorted(
        (v["VulnerabilityID"], v["PkgName"], v["Severity"])
        for v in _vulnerabilities(outcome.report)
    )
    assert found == [
        ("CVE-2023-0286", "libcrypto3", "CRITICAL"),
        ("CVE-2023-0286", "libssl3", "CRITICAL"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id: CVE-2023-0286\nseverity: SEVERE\naffected: []\n", '"SEVERE" is invalid'),
        (
            "id: CVE-2023-0286\naffected:\n  - {ecosystem: pypi, package: x}\n",
            'ecosystem "pypi" is not supported',
        ),
        (
            "id: CVE-2023-0286\naffected:\n  - {ecosystem: alpine, package: openssl}\n",
            "needs a release",
        ),
        (
            "id: CVE-2023-0286\naffected:\n  - {ecosystem: npm, package: ws, fixed: 1}\n",
            "field fixed not found",
        ),
        ("id: not an id\naffected: []\n", 'id "not an id" is invalid'),
    ],
)
def test_invalid_advisory_rejected(tmp_path: Path, text: str, message: str) -> None:
    advisories = tmp_path / "advisories"
    advisories.mkdir()
    (advisories / "bad.yaml").write_text(text)

    with pytest.raises(TrivyDbError) as raised:
        build_trivy_cache(advisories, tmp_path / "cache")
    assert message in str(raised.value)
    assert "bad.yaml" in str(raised.value)
    assert not (tmp_path / "cache" / "db").exists()


def test_duplicate_advisory_rejected(tmp_path: Path) -> None:
    advisories = tmp_path / "advisories"
    advisories.mkdir()
    text = (
        "id: CVE-2023-0286\n"
        "affected:\n"
        "  - {ecosystem: npm, package: ws, vulnerable_versions: ['<1']}\n"
    )
    (advisories / "a.yaml").write_text(text)
    (advisories / "b.yaml").write_text(text)

    with pytest.raises(TrivyDbError, match="also defined in"):
        build_trivy_cache(advisories, tmp_path / "cache")


def test_republish_skips_unchanged_images(fixture_bed: FixtureBed) -> None:
    started = time.monotonic()
    publish_images(fixture_bed.registry, fixture_bed.work_dir)
    elapsed = time.monotonic() - started

    # Every layout is cached and every manifest already in the registry.
    assert elapsed < 10
