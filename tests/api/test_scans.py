"""Scans through the API: submit, poll, results, finding pages, listing and deletion.

The scans run for real: the local executor starts Trivy against the fixture
images in the bed's registry and the fixture vulnerability database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx

from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.db.models import Scan
from secapi.core.scans.service import ScanService
from secapi.core.settings import Settings
from tests.api.conftest import register, submit_scan, wait_for_scan
from tests.testbed.fixture_images import load_catalog

ALPINE = "fixtures/alpine:3.17"
SECRET = "fixtures/secret:1.0"


async def test_submit_answers_accepted(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    image = f"{registry}/{ALPINE}"

    response = await client.post(
        "/api/v1/scan/docker", json={"image": image}, headers=account.headers
    )

    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"scan_id", "status", "image", "created_at"}
    assert body["status"] in ("pending", "running")
    assert body["image"] == image
    assert response.headers["Location"] == f"/api/v1/scans/{body['scan_id']}"
    await wait_for_scan(client, account, body["scan_id"])


async def test_submit_validation_names_field(client: httpx.AsyncClient) -> None:
    account = await register(client)
    cases = [
        ({}, "body.image"),
        ({"image": ""}, "body.image"),
        ({"image": "alpine", "scanners": ["virus"]}, "body.scanners.0"),
        ({"image": "alpine", "severities": ["SEVERE"]}, "body.severities.0"),
        ({"image": "alpine", "colour": "blue"}, "body.colour"),
    ]
    for body, field in cases:
        response = await client.post("/api/v1/scan/docker", json=body, headers=account.headers)
        assert response.status_code == 422, body
        error = response.json()["error"]
        assert error["code"] == "invalid_input", body
        assert error["field"] == field, body


async def test_submit_requires_json_content_type(client: httpx.AsyncClient) -> None:
    account = await register(client)
    cases = [
        ({}, "no Content-Type"),
        ({"Content-Type": "text/plain"}, "Content-Type 'text/plain'"),
        (
            {"Content-Type": "application/x-www-form-urlencoded"},
            "Content-Type 'application/x-www-form-urlencoded'",
        ),
    ]
    for headers, sent in cases:
        response = await client.post(
            "/api/v1/scan/docker",
            content=b'{"image": "alpine:3.20"}',
            headers={**account.headers, **headers},
        )

        assert response.status_code == 422, headers
        error = response.json()["error"]
        assert error["field"] == "body", headers
        assert "Content-Type: application/json" in error["message"], headers
        assert sent in error["message"], headers
        assert "valid dictionary" not in error["message"], headers


async def test_submit_reports_invalid_json_position(client: httpx.AsyncClient) -> None:
    account = await register(client)

    response = await client.post(
        "/api/v1/scan/docker",
        content=b'{\n  "image": "alpine:3.20",\n}',
        headers={**account.headers, "Content-Type": "application/json"},
    )

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "body"
    assert "not valid JSON" in error["message"]
    assert "line 3, column 1" in error["message"]
    assert "decode error" not in error["message"]


async def test_unknown_body_field_names_accepted(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.post(
        "/api/v1/scan/docker",
        json={"image": "alpine:3.20", "scaners": ["vuln"]},
        headers=account.headers,
    )

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "body.scaners"
    assert error["message"].startswith(
        "body.scaners: unknown field 'scaners': POST /api/v1/scan/docker takes "
    )
    for name in ("image", "scanners", "severities", "timeout_seconds"):
        assert name in error["message"], name
    assert error["message"].endswith("; check the spelling")


async def test_problem_count_is_worded_for_one_and_many(client: httpx.AsyncClient) -> None:
    account = await register(client)
    two = {"image": "", "scanners": ["virus"]}
    three = {"image": "", "scanners": ["virus"], "severities": ["SEVERE"]}

    messages = []
    for body in (two, three):
        response = await client.post("/api/v1/scan/docker", json=body, headers=account.headers)
        assert response.status_code == 422, body
        messages.append(response.json()["error"]["message"])

    assert messages[0].endswith("(and 1 more problem, listed in `errors`)"), messages[0]
    assert messages[1].endswith("(and 2 more problems, listed in `errors`)"), messages[1]


async def test_timeout_ceiling_is_the_setting(
    make_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    for maximum in (3600, 86400):
        scanner = {**make_settings().scanner.model_dump(), "max_timeout_seconds": maximum}
        client: httpx.AsyncClient = await make_client(make_settings(scanner=scanner))
        account = await register(client)

        for seconds in (maximum + 1, 99999, 10**9):
            response = await client.post(
                "/api/v1/scan/docker",
                json={"image": "alpine:3.20", "timeout_seconds": seconds},
                headers=account.headers,
            )

            assert response.status_code == 422, (maximum, seconds)
            error = response.json()["error"]
            assert error["field"] == "body.timeout_seconds", (maximum, seconds)
            message = error["message"]
            assert f"timeout_seconds {seconds} is more than" in message, (maximum, seconds)
            assert f"maximum of {maximum} seconds" in message, (maximum, seconds)
            assert "SECAPI_SCANNER__MAX_TIMEOUT_SECONDS" in message, (maximum, seconds)


async def test_submit_rejects_bad_reference(client: httpx.AsyncClient) -> None:
    account = await register(client)
    response = await client.post(
        "/api/v1/scan/docker", json={"image": "UPPER/Case:tag with space"}, headers=account.headers
    )

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "body.image"
    assert error["errors"][0]["field"] == "body.image"
    assert "UPPER/Case:tag with space" in error["message"]


async def test_completed_scan_results(
    client: httpx.AsyncClient, registry: str, make_settings: Callable[..., Settings]
) -> None:
    account = await register(client)
    scan_id = await submit_scan(client, account, f"{registry}/{ALPINE}")
    summary_view = await wait_for_scan(client, account, scan_id)
    assert summary_view["status"] == "completed", summary_view

    response = await client.get(f"/api/v1/scans/{scan_id}", headers=account.headers)
    assert response.status_code == 200
    scan = response.json()
    assert scan["scan_id"] == scan_id
    assert scan["reason"] is None
    assert scan["queue_position"] is None
    assert scan["completed_at"] is not None
    summary = scan["summary"]
    assert (summary["critical"], summary["high"], summary["medium"]) == (0, 6, 6)
    assert summary["total"] == 12
    results = scan["results"]
    assert results["summary"]["total"] == 12
    assert results["os"]["family"] == "alpine"
    assert len(results["vulnerabilities"]) == 12
    first = results["vulnerabilities"][0]
    assert set(first) >= {"id", "package", "installed_version", "fixed_version", "severity"}
    assert {item["package"] for item in results["vulnerabilities"]} == {"libcrypto3", "libssl3"}

    # The stored document is sent byte for byte.
    engine = create_engine(make_settings())
    try:
        async with create_session_factory(engine)() as session:
            row = await session.get(Scan, scan_id)
            assert row is not None
            service = ScanService(session, make_settings(), executor=None)  # type: ignore[arg-type]
            document = await service.results_document(scan=row)
    finally:
        await engine.dispose()
    assert document is not None
    assert document in response.content
    assert json.loads(document) == results


async def test_scan_shows_its_options(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    requested = {
        "scanners": ["vuln"],
        "severities": ["HIGH", "CRITICAL"],
        "ignore_unfixed": True,
        "timeout_seconds": 300,
        "platform": "linux/amd64",
    }
    chosen = await submit_scan(client, account, f"{registry}/{ALPINE}", **requested)
    defaulted = await submit_scan(client, account, f"{registry}/{ALPINE}")
    await wait_for_scan(client, account, chosen)
    await wait_for_scan(client, account, defaulted)

    detail = (await client.get(f"/api/v1/scans/{chosen}", headers=account.headers)).json()
    assert detail["options"] == requested
    summary_view = (
        await client.get(f"/api/v1/scans/{chosen}?include_findings=false", headers=account.headers)
    ).json()
    assert summary_view["options"] == requested

    listing = (await client.get("/api/v1/scans", headers=account.headers)).json()
    options_by_id = {item["scan_id"]: item["options"] for item in listing["items"]}
    assert options_by_id[chosen] == requested
    assert options_by_id[defaulted] == {
        "scanners": ["vuln", "secret"],
        "severities": ["UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL"],
        "ignore_unfixed": False,
        "timeout_seconds": None,
        "platform": None,
    }


# RFC 3339 in UTC with "Z", as every timestamp of every response is written.
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")


def timestamps_in(document: Any, path: str = "") -> dict[str, str]:
    """Return every `*_at` value in a JSON document, keyed by its path."""
    found: dict[str, str] = {}
    if isinstance(document, dict):
        for key, value in document.items():
            if key.endswith("_at") and value is not None:
                found[f"{path}.{key}"] = value
            found.update(timestamps_in(value, f"{path}.{key}"))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found.update(timestamps_in(value, f"{path}[{index}]"))
    return found


async def test_timestamps_share_one_format(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    accepted = await client.post(
        "/api/v1/scan/docker", json={"image": f"{registry}/{ALPINE}"}, headers=account.headers
    )
    scan_id = accepted.json()["scan_id"]
    await wait_for_scan(client, account, scan_id)

    full = (await client.get(f"/api/v1/scans/{scan_id}", headers=account.headers)).json()
    summary_view = (
        await client.get(f"/api/v1/scans/{scan_id}?include_findings=false", headers=account.headers)
    ).json()
    # One comes from the stored results document, the other from the scan's row.
    assert full["results"]["db_updated_at"] is not None
    assert full["results"]["db_updated_at"] == summary_view["results"]["db_updated_at"]

    responses = {
        "submit": accepted.json(),
        "scan": full,
        "scan without findings": summary_view,
        "scans": (await client.get("/api/v1/scans", headers=account.headers)).json(),
        "me": (await client.get("/api/v1/auth/me", headers=account.headers)).json(),
        "keys": (await client.get("/api/v1/auth/keys", headers=account.headers)).json(),
        "audit": (await client.get("/api/v1/audit", headers=account.headers)).json(),
    }
    found = {
        f"{name}{path}": value
        for name, document in responses.items()
        for path, value in timestamps_in(document).items()
    }
    assert "scan.results.db_updated_at" in found
    assert "audit.items[0].occurred_at" in found
    for where, value in found.items():
        assert TIMESTAMP.fullmatch(value), (where, value)


async def test_results_without_findings(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    scan_id = await submit_scan(client, account, f"{registry}/{ALPINE}")
    await wait_for_scan(client, account, scan_id)

    response = await client.get(
        f"/api/v1/scans/{scan_id}?include_findings=false", headers=account.headers
    )

    results = response.json()["results"]
    assert results["summary"]["high"] == 6
    assert results["os"]["family"] == "alpine"
    assert results["trivy_version"]
    for kind in ("vulnerabilities", "secrets", "misconfigurations"):
        assert kind not in results


async def test_vulnerability_pages(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    scan_id = await submit_scan(client, account, f"{registry}/{ALPINE}")
    await wait_for_scan(client, account, scan_id)
    base = f"/api/v1/scans/{scan_id}/vulnerabilities"

    first = (await client.get(f"{base}?page_size=5", headers=account.headers)).json()
    third = (await client.get(f"{base}?page_size=5&page=3", headers=account.headers)).json()
    assert first["total"] == 12
    assert len(first["items"]) == 5
    assert len(third["items"]) == 2
    assert (third["page"], third["page_size"]) == (3, 5)

    high = (await client.get(f"{base}?severity=HIGH", headers=account.headers)).json()
    assert high["total"] == 6
    assert {item["severity"] for item in high["items"]} == {"HIGH"}
    critical = (await client.get(f"{base}?severity=CRITICAL", headers=account.headers)).json()
    assert critical["total"] == 0

    bad = await client.get(f"{base}?severity=SEVERE", headers=account.headers)
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "query.severity"
    assert "SEVERE" in bad.json()["error"]["message"]


async def test_severity_filter_takes_several(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    scan_id = await submit_scan(client, account, f"{registry}/{ALPINE}")
    await wait_for_scan(client, account, scan_id)
    base = f"/api/v1/scans/{scan_id}"

    # The fixture image has 6 HIGH and 6 MEDIUM vulnerabilities.
    totals = {
        "severity=HIGH&severity=MEDIUM": 12,
        "severity=HIGH,MEDIUM": 12,
        "severity=high,%20medium": 12,
        "severity=High&severity=HIGH": 6,
        "severity=critical": 0,
        "severity=critical&severity=high": 6,
    }
    for query, expected in totals.items():
        response = await client.get(f"{base}/vulnerabilities?{query}", headers=account.headers)
        assert response.status_code == 200, (query, response.text)
        assert response.json()["total"] == expected, query

    both = await client.get(
        f"{base}/vulnerabilities?severity=high,medium&page_size=100", headers=account.headers
    )
    assert {item["severity"] for item in both.json()["items"]} == {"HIGH", "MEDIUM"}

    for kind in ("secrets", "misconfigurations", "licenses"):
        response = await client.get(
            f"{base}/{kind}?severity=high&severity=critical,low", headers=account.headers
        )
        assert response.status_code == 200, (kind, response.text)

    for query, bad in (("severity=HIGH,SEVERE", "'SEVERE'"), ("severity=HIGH,", "''")):
        response = await client.get(f"{base}/vulnerabilities?{query}", headers=account.headers)
        assert response.status_code == 422, query
        error = response.json()["error"]
        assert error["field"] == "query.severity", query
        assert f"severity {bad} is invalid" in error["message"], query


async def test_openapi_documents_severity_lists(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()

    for kind in ("vulnerabilities", "secrets", "misconfigurations", "licenses"):
        operation = schema["paths"][f"/api/v1/scans/{{scan_id}}/{kind}"]["get"]
        parameter = next(item for item in operation["parameters"] if item["name"] == "severity")
        assert "severity=HIGH,CRITICAL" in parameter["description"], kind
        assert "severity=HIGH&severity=CRITICAL" in parameter["description"], kind
        variants = parameter["schema"].get("anyOf", [parameter["schema"]])
        assert {"type": "array", "items": {"type": "string"}} in variants, kind


async def test_secret_findings(client: httpx.AsyncClient, registry: str) -> None:
    expected = _catalog_entry(SECRET)["expect"]["secrets"]
    account = await register(client)
    scan_id = await submit_scan(client, account, f"{registry}/{SECRET}")
    scan = await wait_for_scan(client, account, scan_id)
    assert scan["summary"]["secrets"] == len(expected)

    page = (await client.get(f"/api/v1/scans/{scan_id}/secrets", headers=account.headers)).json()
    assert page["total"] == len(expected)
    found = [
        (item["rule_id"], item["target"], item["start_line"], item["severity"])
        for item in page["items"]
    ]
    wanted = [
        (secret["rule_id"], secret["target"], secret["line"], secret["severity"])
        for secret in expected
    ]
    assert sorted(found) == sorted(wanted)

    misconfigurations = await client.get(
        f"/api/v1/scans/{scan_id}/misconfigurations", headers=account.headers
    )
    assert misconfigurations.status_code == 200
    assert misconfigurations.json()["total"] == 0


def _catalog_entry(reference: str) -> dict[str, Any]:
    for entry in load_catalog():
        if f"{entry['name']}:{entry['tag']}" == reference:
            return entry
    raise AssertionError(f"{reference} is not in the fixture image catalog")


async def test_missing_image_fails_with_reason(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    scan_id = await submit_scan(client, account, f"{registry}/fixtures/absent:1.0")
    scan = await wait_for_scan(client, account, scan_id)

    assert scan["status"] == "failed"
    assert scan["reason"] == "ImageNotFound"
    assert scan["message"]
    assert scan["results"] is None
    assert scan["summary"] is None
    # The list shows why it failed too, so a user need not open each failed scan.
    listing = await client.get("/api/v1/scans?status=failed", headers=account.headers)
    [item] = listing.json()["items"]
    assert item["reason"] == "ImageNotFound"
    assert item["message"] == scan["message"]


async def test_list_newest_first_with_filter(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    completed = await submit_scan(client, account, f"{registry}/{ALPINE}")
    await wait_for_scan(client, account, completed)
    failed = await submit_scan(client, account, f"{registry}/fixtures/absent:1.0")
    await wait_for_scan(client, account, failed)

    listing = (await client.get("/api/v1/scans", headers=account.headers)).json()
    assert [item["scan_id"] for item in listing["items"]] == [failed, completed]
    assert listing["total"] == 2
    assert (listing["page"], listing["page_size"]) == (1, 20)
    assert listing["items"][1]["summary"]["high"] == 6

    only_failed = (await client.get("/api/v1/scans?status=failed", headers=account.headers)).json()
    assert [item["scan_id"] for item in only_failed["items"]] == [failed]
    # Several statuses, repeated or separated by commas, in any letter case.
    for query in ("status=failed,Completed", "status=failed&status=completed"):
        both = (await client.get(f"/api/v1/scans?{query}", headers=account.headers)).json()
        assert [item["scan_id"] for item in both["items"]] == [failed, completed], query
        assert both["total"] == 2, query
    active = (
        await client.get("/api/v1/scans?status=pending,running", headers=account.headers)
    ).json()
    assert (active["items"], active["total"]) == ([], 0)

    second_page = (
        await client.get("/api/v1/scans?page=2&page_size=1", headers=account.headers)
    ).json()
    assert [item["scan_id"] for item in second_page["items"]] == [completed]

    too_big = await client.get("/api/v1/scans?page_size=500", headers=account.headers)
    assert too_big.status_code == 422
    bad_status = await client.get("/api/v1/scans?status=failed,done", headers=account.headers)
    assert bad_status.status_code == 422
    error = bad_status.json()["error"]
    assert error["field"] == "query.status"
    assert "'done'" in error["message"]
    assert "pending, running, completed, failed" in error["message"]


async def test_delete_removes_scan(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    scan_id = await submit_scan(client, account, f"{registry}/{ALPINE}")
    await wait_for_scan(client, account, scan_id)
    # Read with findings twice, so the results document is in the server's cache and the
    # second read comes from it.
    first = await client.get(f"/api/v1/scans/{scan_id}", headers=account.headers)
    second = await client.get(f"/api/v1/scans/{scan_id}", headers=account.headers)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert first.json()["results"]["vulnerabilities"]

    deleted = await client.delete(f"/api/v1/scans/{scan_id}", headers=account.headers)
    assert deleted.status_code == 204

    assert (
        await client.get(f"/api/v1/scans/{scan_id}", headers=account.headers)
    ).status_code == 404
    listing = (await client.get("/api/v1/scans", headers=account.headers)).json()
    assert scan_id not in [item["scan_id"] for item in listing["items"]]
    again = await client.delete(f"/api/v1/scans/{scan_id}", headers=account.headers)
    assert again.status_code == 404


async def test_scan_actions_audited(client: httpx.AsyncClient, registry: str) -> None:
    account = await register(client)
    image = f"{registry}/{ALPINE}"
    scan_id = await submit_scan(client, account, image)
    await wait_for_scan(client, account, scan_id)
    await client.delete(f"/api/v1/scans/{scan_id}", headers=account.headers)
    await client.get(f"/api/v1/scans/{scan_id}", headers=account.headers)

    events = (await client.get("/api/v1/audit?page_size=100", headers=account.headers)).json()
    by_action: dict[str, list[dict[str, object]]] = {}
    for event in events["items"]:
        by_action.setdefault(str(event["action"]), []).append(event)

    # One event each: the service writes the success with the change, the route only failures.
    assert len(by_action["scan.submit"]) == len(by_action["scan.delete"]) == 1
    submit = by_action["scan.submit"][0]
    assert submit["resource_id"] == scan_id
    assert submit["outcome"] == "success"
    assert submit["details"] == {"image": image}
    delete = by_action["scan.delete"][0]
    assert (delete["resource_id"], delete["outcome"]) == (scan_id, "success")
    reads = by_action["scan.read"]
    assert reads[0]["outcome"] == "failure"
    assert reads[0]["details"] == {"error": "not_found"}
    assert any(read["outcome"] == "success" for read in reads)


async def test_concurrent_scan_quota(
    make_client: Callable[..., object], make_settings: Callable[..., Settings], registry: str
) -> None:
    from tests.api.conftest import tiers

    settings = make_settings(
        tiers=tiers(concurrent_scans=1),
        scanner={**make_settings().scanner.model_dump(), "max_concurrent_scans": 1},
    )
    client: httpx.AsyncClient = await make_client(settings)  # type: ignore[misc]
    account = await register(client)
    first = await submit_scan(client, account, f"{registry}/{ALPINE}")

    refused = await client.post(
        "/api/v1/scan/docker", json={"image": f"{registry}/{ALPINE}"}, headers=account.headers
    )
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["X-RateLimit-Limit"] == "1"

    await wait_for_scan(client, account, first)
    accepted = await submit_scan(client, account, f"{registry}/{ALPINE}")
    await wait_for_scan(client, account, accepted)


async def test_scans_per_hour(
    make_client: Callable[..., object], make_settings: Callable[..., Settings], registry: str
) -> None:
    from tests.api.conftest import tiers

    client: httpx.AsyncClient = await make_client(  # type: ignore[misc]
        make_settings(tiers=tiers(scans_per_hour=1))
    )
    account = await register(client)
    invalid = await client.post(
        "/api/v1/scan/docker", json={"image": "Bad Reference"}, headers=account.headers
    )
    assert invalid.status_code == 422

    first = await submit_scan(client, account, f"{registry}/{ALPINE}")
    refused = await client.post(
        "/api/v1/scan/docker", json={"image": f"{registry}/{ALPINE}"}, headers=account.headers
    )
    assert refused.status_code == 429
    assert "scan submissions per hour" in refused.json()["error"]["message"]
    assert 3000 <= int(refused.headers["Retry-After"]) <= 3600
    await wait_for_scan(client, account, first)
