"""The one error body: every status sends code, message, field and errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from secapi.api.app import create_app
from secapi.api.query import accepted_query_parameters
from secapi.core.settings import Settings
from tests.api.conftest import ClientFactory, register, tiers

ERROR_KEYS = {"code", "message", "field", "errors"}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """Return the error object after checking the status and the body's shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["code"], str), error
    assert error["code"], error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    assert isinstance(error["errors"], list), error
    return error


def assert_no_field(error: dict[str, Any]) -> None:
    assert error["field"] is None, error
    assert error["errors"] == [], error


async def test_client_errors_have_every_key(client: httpx.AsyncClient) -> None:
    account = await register(client)

    missing_key = error_of(await client.get("/api/v1/auth/me"), 401)
    assert_no_field(missing_key)
    unknown_key = error_of(
        await client.get("/api/v1/auth/me", headers={"X-API-Key": "sk_unknown"}), 401
    )
    assert_no_field(unknown_key)

    unknown_scan = error_of(
        await client.get("/api/v1/scans/no-such-scan", headers=account.headers), 404
    )
    assert_no_field(unknown_scan)
    unknown_path = error_of(await client.get("/api/v1/nothing-here"), 404)
    assert_no_field(unknown_path)
    wrong_method = error_of(await client.put("/health"), 405)
    assert_no_field(wrong_method)

    duplicate = error_of(
        await client.post("/api/v1/auth/register", json={"email": account.email}), 409
    )
    assert_no_field(duplicate)


async def test_invalid_input_lists_problems(client: httpx.AsyncClient) -> None:
    account = await register(client)

    # Rejected by the request model.
    schema_error = error_of(
        await client.post("/api/v1/scan/docker", json={}, headers=account.headers), 422
    )
    assert schema_error["field"] == "body.image"
    assert schema_error["errors"][0]["field"] == "body.image"

    # Rejected by the scan service, after the request model accepted it.
    service_error = error_of(
        await client.post(
            "/api/v1/scan/docker", json={"image": "Bad/Reference"}, headers=account.headers
        ),
        422,
    )
    assert service_error["field"] is not None
    assert service_error["errors"] == [
        {"field": service_error["field"], "message": service_error["message"]}
    ]


async def test_rate_limit_error_has_every_key(
    make_client: ClientFactory, make_settings: Callable[..., Settings]
) -> None:
    client = await make_client(make_settings(tiers=tiers(requests_per_minute=1)))
    account = await register(client)
    first = await client.get("/api/v1/auth/me", headers=account.headers)
    assert first.status_code == 200

    limited = error_of(await client.get("/api/v1/auth/me", headers=account.headers), 429)

    assert_no_field(limited)


async def test_unavailable_error_has_every_key(
    make_client: ClientFactory, make_settings: Callable[..., Settings]
) -> None:
    base = make_settings()
    # Without Trivy the local executor starts but cannot take scans.
    scanner = {**base.scanner.model_dump(), "trivy_bin": "/nonexistent/trivy"}
    client = await make_client(make_settings(scanner=scanner))
    account = await register(client)

    unavailable = error_of(
        await client.post(
            "/api/v1/scan/docker", json={"image": "alpine:3.20"}, headers=account.headers
        ),
        503,
    )

    assert_no_field(unavailable)


async def test_openapi_requires_every_error_key(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]

    detail = schemas["ErrorDetail"]
    assert set(detail["required"]) == ERROR_KEYS
    field_types = {variant.get("type") for variant in detail["properties"]["field"]["anyOf"]}
    assert field_types == {"string", "null"}
    assert detail["properties"]["errors"]["type"] == "array"


async def test_query_parameter_names_are_ready_at_startup(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings())
    assert app.openapi_schema is None

    async with app.router.lifespan_context(app):
        # Built on the first request instead, the OpenAPI document delayed it by about 150 ms.
        assert app.openapi_schema is not None
        assert "page_size" in accepted_query_parameters(app)[("/api/v1/scans", "get")]


async def test_unknown_query_parameter_is_rejected(client: httpx.AsyncClient) -> None:
    account = await register(client)
    # Each is a likely misspelling that, ignored, would return unfiltered results.
    for path, name in (
        ("/api/v1/scans?pagesize=1", "pagesize"),
        (
            "/api/v1/scans/00000000-0000-4000-8000-000000000000/vulnerabilities?severities=HIGH",
            "severities",
        ),
        ("/api/v1/audit?actions=scan.submit", "actions"),
    ):
        response = await client.get(path, headers=account.headers)

        assert response.status_code == 422, path
        error = response.json()["error"]
        assert error["code"] == "unknown_parameter", path
        assert error["field"] == f"query.{name}", path
        assert f"unknown query parameter {name!r}" in error["message"], path
        assert "check the spelling" in error["message"], path

    listed = await client.get("/api/v1/scans?page_size=1&page=1", headers=account.headers)
    assert listed.status_code == 200
    assert (await client.get("/health?probe=1")).status_code == 200
