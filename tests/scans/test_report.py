"""The report parser, on reports that Trivy wrote for the fixture images and on broken ones."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from secapi.core.scans.options import ScanOptions
from secapi.core.scans.report import (
    PARALLEL_HASH_BYTES,
    ParsedReport,
    ReportError,
    parse_report,
)
from tests.scans.conftest import ReportFactory
from tests.scans.servers import push_files_image
from tests.testbed.fixture_images import load_catalog

MISCONFIG_FILES = {
    "app/Dockerfile": "FROM alpine:3.17\nRUN apk add curl\nUSER root\n",
    "deploy/pod.yaml": (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n"
        "    - name: c\n      image: nginx\n      securityContext:\n        privileged: true\n"
    ),
}


def raw_findings(path: Path) -> dict[str, set[tuple[Any, ...]]]:
    """Read a report with json.load, the plain way, for comparison with the parser."""
    data = json.loads(path.read_text())
    found: dict[str, set[tuple[Any, ...]]] = {
        "vuln": set(),
        "secret": set(),
        "misconfig": set(),
        "license": set(),
    }
    for result in data.get("Results") or []:
        for item in result.get("Vulnerabilities") or []:
            found["vuln"].add(
                (
                    item["VulnerabilityID"],
                    item["PkgName"],
                    item["InstalledVersion"],
                    result["Target"],
                )
            )
        for item in result.get("Secrets") or []:
            found["secret"].add((item["RuleID"], result["Target"], item["StartLine"]))
        for item in result.get("Misconfigurations") or []:
            found["misconfig"].add((item["ID"], result["Target"], item["Severity"]))
        for item in result.get("Licenses") or []:
            found["license"].add(
                (item["Name"], item["PkgName"] or None, result["Target"], item["Severity"])
            )
    return found


def parsed_findings(report: ParsedReport) -> dict[str, set[tuple[Any, ...]]]:
    return {
        "vuln": {(v.id, v.package, v.installed_version, v.target) for v in report.vulnerabilities},
        "secret": {(s.rule_id, s.target, s.start_line) for s in report.secrets},
        "misconfig": {(m.id, m.target, m.severity) for m in report.misconfigurations},
        "license": {(x.name, x.package, x.target, x.severity) for x in report.licenses},
    }


def catalog_entry(name: str) -> dict[str, Any]:
    return next(entry for entry in load_catalog() if entry["name"] == name)


@pytest.mark.parametrize(
    "name", ["fixtures/alpine", "fixtures/debian", "fixtures/app", "fixtures/secret"]
)
def test_parser_matches_trivy_output(name: str, registry: str, trivy_report: ReportFactory) -> None:
    entry = catalog_entry(name)
    path = trivy_report(f"{registry}/{name}:{entry['tag']}")

    report = parse_report(path)

    assert parsed_findings(report) == raw_findings(path)
    assert len(report.vulnerabilities) == entry["expect"]["vulnerability_count"]
    expected = {(v["id"], v["package"], v["installed"]) for v in entry["expect"]["vulnerabilities"]}
    assert {(v.id, v.package, v.installed_version) for v in report.vulnerabilities} == expected
    expected_secrets = {(s["rule_id"], s["target"], s["line"]) for s in entry["expect"]["secrets"]}
    assert {(s.rule_id, s.target, s.start_line) for s in report.secrets} == expected_secrets


def test_alpine_report_fields(registry: str, trivy_report: ReportFactory) -> None:
    path = trivy_report(f"{registry}/fixtures/alpine:3.17")
    raw = json.loads(path.read_text())

    report = parse_report(path)

    assert report.os_family == "alpine"
    assert report.os_name == "3.17.0"
    assert raw["Metadata"]["OS"]["EOSL"] is True
    assert report.os_eosl is True
    assert report.trivy_version == "0.74.0"
    assert report.artifact_name == f"{registry}/fixtures/alpine:3.17"
    digest = raw["Metadata"]["RepoDigests"][0].split("@")[1]
    assert report.image_digest == digest
    assert digest.startswith("sha256:")
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report.size == path.stat().st_size

    first = report.vulnerabilities[0]
    raw_first = raw["Results"][0]["Vulnerabilities"][0]
    assert first.id == raw_first["VulnerabilityID"]
    assert first.fixed_version == raw_first["FixedVersion"]
    assert first.title == raw_first.get("Title")
    assert first.primary_url == raw_first.get("PrimaryURL")
    assert first.target_class == "os-pkgs"
    assert first.package_type == "alpine"

    summary = report.summary
    assert (summary.critical, summary.high, summary.medium, summary.low, summary.unknown) == (
        0,
        6,
        6,
        0,
        0,
    )
    assert summary.total == 12
    assert summary.secrets == 0


def test_package_path_of_vulnerabilities(registry: str, trivy_report: ReportFactory) -> None:
    path = trivy_report(f"{registry}/fixtures/app:1.0")
    raw = [
        item
        for result in json.loads(path.read_text())["Results"]
        for item in result.get("Vulnerabilities") or []
    ]

    report = parse_report(path)

    assert [v.package_path for v in report.vulnerabilities] == [item["PkgPath"] for item in raw]
    requests = next(v for v in report.vulnerabilities if v.package == "requests")
    # For language packages the target is only the ecosystem; the path says where the package is.
    assert requests.target == "Python"
    assert requests.package_path == (
        "usr/local/lib/python3.11/site-packages/requests-2.28.2.dist-info/METADATA"
    )
    lodash = next(v for v in report.vulnerabilities if v.package == "lodash")
    assert lodash.package_path == "srv/app/node_modules/lodash/package.json"


def test_os_packages_have_no_path(registry: str, trivy_report: ReportFactory) -> None:
    report = parse_report(trivy_report(f"{registry}/fixtures/alpine:3.17"))

    assert len(report.vulnerabilities) == 12
    assert {v.package_path for v in report.vulnerabilities} == {None}


@pytest.mark.parametrize(
    "name", ["fixtures/alpine", "fixtures/debian", "fixtures/app", "fixtures/secret"]
)
def test_os_matches_catalog(name: str, registry: str, trivy_report: ReportFactory) -> None:
    entry = catalog_entry(name)
    expected = entry["expect"]["os"]

    report = parse_report(trivy_report(f"{registry}/{name}:{entry['tag']}"))

    if expected is None:
        assert (report.os_family, report.os_name, report.os_eosl) == (None, None, None)
    else:
        # Trivy leaves EOSL out when it is false, as for Debian 12.
        assert (report.os_family, report.os_name, report.os_eosl) == (
            expected["family"],
            expected["name"],
            expected["eosl"],
        )


def test_secret_fields(registry: str, trivy_report: ReportFactory) -> None:
    report = parse_report(trivy_report(f"{registry}/fixtures/secret:1.0"))

    github = next(s for s in report.secrets if s.rule_id == "github-pat")
    assert github.severity == "CRITICAL"
    assert github.category == "GitHub"
    assert github.title
    assert github.target == "/srv/app/deploy.env"
    assert (github.start_line, github.end_line) == (3, 3)
    assert report.os_family is None
    assert report.summary.secrets == 2


def test_misconfiguration_fields(
    registry: str, trivy_report: ReportFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    image = f"{registry}/scan-tests/misconfig:1"
    push_files_image(MISCONFIG_FILES, work=tmp_path_factory.mktemp("misconfig"), destination=image)
    path = trivy_report(image, options=ScanOptions(scanners=["misconfig"]))

    report = parse_report(path)

    assert parsed_findings(report) == raw_findings(path)
    root = next(m for m in report.misconfigurations if m.id == "DS-0002")
    assert root.target == "app/Dockerfile"
    assert root.target_type == "dockerfile"
    assert root.severity == "HIGH"
    assert root.message and "root" in root.message
    assert root.resolution
    assert root.primary_url and root.primary_url.endswith("ds-0002")
    assert any(m.target == "deploy/pod.yaml" for m in report.misconfigurations)


def test_license_fields(registry: str, trivy_report: ReportFactory) -> None:
    options = ScanOptions(scanners=["vuln", "license"])
    path = trivy_report(f"{registry}/fixtures/app:1.0", options=options)
    raw = [
        (result, item)
        for result in json.loads(path.read_text())["Results"]
        for item in result.get("Licenses") or []
    ]

    report = parse_report(path)

    assert parsed_findings(report) == raw_findings(path)
    assert len(raw) == 9
    assert len(report.licenses) == 9
    assert report.summary.licenses == 9
    # Licenses count apart from vulnerabilities.
    assert report.summary.total == len(report.vulnerabilities) == 15
    for (result, item), found in zip(raw, report.licenses, strict=True):
        assert found.name == item["Name"]
        assert found.package == item["PkgName"]
        assert found.severity == item["Severity"]
        assert found.category == item["Category"]
        assert found.target == result["Target"]
        assert found.target_class == "license"
        assert found.package_path == item["FilePath"]
        assert found.confidence == item["Confidence"]
        assert found.link is None
    requests = next(x for x in report.licenses if x.package == "requests")
    assert requests.name == "Apache-2.0"
    assert requests.target == "Python"
    assert requests.package_path == (
        "usr/local/lib/python3.11/site-packages/requests-2.28.2.dist-info/METADATA"
    )


def test_os_package_licenses_have_no_path(registry: str, trivy_report: ReportFactory) -> None:
    options = ScanOptions(scanners=["license"])
    report = parse_report(trivy_report(f"{registry}/fixtures/alpine:3.17", options=options))

    busybox = next(x for x in report.licenses if x.package == "busybox")
    assert (busybox.name, busybox.severity, busybox.category) == (
        "GPL-2.0-only",
        "HIGH",
        "restricted",
    )
    assert busybox.target == "OS Packages"
    assert busybox.package_path is None
    assert len(report.licenses) == 7
    assert report.vulnerabilities == []


def test_many_findings_report(registry: str, trivy_report: ReportFactory) -> None:
    path = trivy_report(f"{registry}/fixtures/many-findings:1.0")

    report = parse_report(path)

    assert len(report.vulnerabilities) == 3200
    assert parsed_findings(report) == raw_findings(path)
    # Reports this large are hashed in a thread while they are decoded.
    assert report.size >= PARALLEL_HASH_BYTES
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # The 160 copies share one target, Node.js, and differ only in their package paths.
    assert {v.target for v in report.vulnerabilities} == {"Node.js"}
    folders: dict[str, int] = {}
    for vulnerability in report.vulnerabilities:
        assert vulnerability.package_path is not None
        folder = vulnerability.package_path.split("/node_modules/")[0]
        folders[folder] = folders.get(folder, 0) + 1
    assert folders == {f"srv/app-{index:03d}": 20 for index in range(1, 161)}


def _peak_parse_memory(source: Path) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        report = parse_report(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.vulnerabilities
    return peak


def _scaled_report(path: Path, factor: int, out: Path) -> int:
    """Write a report with every result of ``path`` repeated ``factor`` times; return findings."""
    data = json.loads(path.read_text())
    results = data["Results"]
    data["Results"] = [
        dict(result, Target=f"{result['Target']}#{n}") for n in range(factor) for result in results
    ]
    out.write_text(json.dumps(data))
    return sum(len(result.get("Vulnerabilities") or []) for result in data["Results"])


def test_ingest_memory_stays_below_five_times_report(
    registry: str, trivy_report: ReportFactory, tmp_path: Path
) -> None:
    source = trivy_report(f"{registry}/fixtures/many-findings:1.0")
    large = tmp_path / "large.json"
    assert _scaled_report(source, 10, large) == 32000

    for path in (source, large):
        peak = _peak_parse_memory(path)
        size = path.stat().st_size
        assert peak < 5 * size, f"{path.name}: peak {peak} bytes for a {size}-byte report"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"[]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"{", "not valid JSON"),
        (b'{"SchemaVersion": 2', "not valid JSON"),
        (b'{"SchemaVersion": 2} trailing', "not valid JSON"),
        (b'{"SchemaVersion": 2}{"SchemaVersion": 2}', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"{}", "SchemaVersion is None"),
        (b'{"SchemaVersion": 1}', "SchemaVersion is 1"),
        (b'{"SchemaVersion": 2, "Results": {}}', "Results is an object, expected a list"),
        (
            b'{"SchemaVersion": 2, "Metadata": {"OS": {"Family": "alpine", "EOSL": "yes"}}}',
            "Metadata.OS.EOSL is a string, expected a boolean",
        ),
        (b'{"SchemaVersion": 2, "Results": [1]}', "Results[0] is an integer, expected an object"),
        (
            b'{"SchemaVersion": 2, "Results": [{"Target": 5}]}',
            "Results[0].Target is an integer, expected a string",
        ),
        (
            b'{"SchemaVersion": 2, "Results": [{"Target": "t", "Class": "c", "Type": "x",'
            b' "Vulnerabilities": {}}]}',
            "Results[0].Vulnerabilities is an object, expected a list",
        ),
        (
            b'{"SchemaVersion": 2, "Results": [{"Target": "t", "Class": "c", "Type": "x",'
            b' "Vulnerabilities": ["CVE-1"]}]}',
            "Results[0].Vulnerabilities[0] is a string, expected an object",
        ),
        (
            b'{"SchemaVersion": 2, "Results": [{"Target": "t", "Class": "c", "Type": "x",'
            b' "Vulnerabilities": [{"PkgName": "p"}]}]}',
            "Results[0].Vulnerabilities[0] has no VulnerabilityID",
        ),
        (
            b'{"SchemaVersion": 2, "Results": [{"Target": "t", "Class": "c", "Type": "x",'
            b' "Vulnerabilities": [{"VulnerabilityID": "CVE-1", "PkgName": "p",'
            b' "Severity": "SEVERE"}]}]}',
            "severity 'SEVERE'",
        ),
        (
            b'{"SchemaVersion": 2, "Results": [{"Target": "t", "Class": "c", "Type": "x",'
            b' "Secrets": [{"RuleID": "r", "StartLine": "3"}]}]}',
            "Results[0].Secrets[0].StartLine is a string, expected an integer",
        ),
        (
            b'{"SchemaVersion": 2, "Results": [{"Target": "t", "Class": "license",'
            b' "Licenses": [{"PkgName": "p", "Severity": "LOW"}]}]}',
            "Results[0].Licenses[0] has no Name",
        ),
        (
            b'{"SchemaVersion": 2, "Results": [{"Target": "t", "Class": "license",'
            b' "Licenses": [{"Name": "MIT", "Confidence": "high"}]}]}',
            "Results[0].Licenses[0].Confidence is a string, expected a number",
        ),
        (
            b'{"SchemaVersion": 2, "Results": [{"Vulnerabilities":'
            b' [{"VulnerabilityID": "CVE-1", "PkgName": "p"}]}]}',
            "has findings but no Target",
        ),
    ],
)
def test_invalid_report_is_rejected(content: bytes, problem: str) -> None:
    with pytest.raises(ReportError) as raised:
        parse_report(content)

    assert problem in str(raised.value)


def test_size_limit() -> None:
    content = b'{"SchemaVersion": 2, "ArtifactName": "' + b"a" * 5000 + b'"}'

    with pytest.raises(ReportError) as raised:
        parse_report(content, max_bytes=1024)
    assert "larger than the maximum of 1024 bytes" in str(raised.value)
    assert parse_report(content, max_bytes=len(content)).size == len(content)


def test_fields_in_any_order() -> None:
    content = json.dumps(
        {
            "Results": [
                {
                    "Vulnerabilities": [
                        {"VulnerabilityID": "CVE-1", "PkgName": "p", "InstalledVersion": "1"}
                    ],
                    "Type": "npm",
                    "Class": "lang-pkgs",
                    "Target": "app/package.json",
                }
            ],
            "SchemaVersion": 2,
        }
    ).encode()

    report = parse_report(io.BytesIO(content))

    (vulnerability,) = report.vulnerabilities
    assert vulnerability.target == "app/package.json"
    assert vulnerability.target_class == "lang-pkgs"
    assert vulnerability.package_type == "npm"
    assert vulnerability.severity == "UNKNOWN"
