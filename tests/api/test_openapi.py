"""The OpenAPI document, and schemathesis against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

from tests.api.conftest import Database
from tests.testbed.bed import Testbed
from tests.testbed.services import POSTGRES_USER

DRIVER = Path(__file__).with_name("schemathesis_run.py")


async def test_openapi_documents_errors_and_security(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()

    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": schemes["ApiKey"]["description"],
    }
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error_ref = "#/components/schemas/ErrorResponse"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            public = path in ("/health", "/ready", "/api/v1/auth/register")
            assert ("security" not in operation) == public, where
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/ready":
                    content = response["content"]["application/json"]["schema"]
                    assert content == {"$ref": error_ref}, f"{where} {status}"
            if not public:
                assert {"401", "422", "429"} <= set(operation["responses"]), where

    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


async def test_docs_use_local_assets(client: httpx.AsyncClient) -> None:
    for page, script in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        response = await client.get(page)
        assert response.status_code == 200, page
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", response.text)
        assert any(url.endswith(script) for url in urls), (page, urls)
        assert "cdn" not in response.text.lower(), page

        for url in urls:
            # A local URL is a path on this server: no scheme, no host.
            assert url.startswith("/"), (page, url)
            assert not url.startswith("//"), (page, url)
            asset = await client.get(url)
            assert asset.status_code == 200, (page, url)
            assert len(asset.content) > 0, (page, url)


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["version"]

    ready = await client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "executor": "ok"},
    }


async def test_unknown_path_uses_error_body(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"

    wrong_method = await client.put("/health")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_schemathesis_finds_no_violations(
    testbed: Testbed, database: Database, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "SECAPI_SCANNER__TRIVY_BIN": testbed.env["TRIVY_BIN"],
        "SECAPI_SCANNER__CACHE_DIR": testbed.env["SECAPI_TEST_TRIVY_CACHE"],
        "SECAPI_SCANNER__OFFLINE": "true",
        "SECAPI_SCANNER__TIMEOUT_SECONDS": "30",
        "DATABASE_URL": "",
    }
    if database.backend == "postgresql":
        # TCP to the bed does not cross into the new network namespace; its Unix socket does.
        sockets = testbed.paths.postgres_root / "sockets"
        url = make_url(database.url)
        env["DATABASE_URL"] = (
            f"postgresql://{POSTGRES_USER}@/{url.database}?host={sockets}&port={url.port}"
        )

    result = subprocess.run(
        ["unshare", "--net", sys.executable, str(DRIVER), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )

    server_log = tmp_path / "server.log"
    report = result.stdout[-8000:] + result.stderr[-3000:]
    if server_log.exists():
        report += "\nserver log:\n" + server_log.read_text()[-3000:]
    assert result.returncode == 0, report
    assert "passed" in result.stdout
