"""`secapi scan` for CI pipelines, against a real `secapi serve` and real Trivy scans."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from secapi.core.settings import Settings
from tests.api.conftest import (
    SECAPI,
    TEST_SECRET_KEY,
    Database,
    Server,
    new_email,
    start_server,
    stop_server,
)
from tests.scans.servers import silent_server
from tests.testbed.bed import Testbed

ALPINE = "fixtures/alpine:3.17"
SECRET = "fixtures/secret:1.0"


def server_settings(
    database: Database, testbed: Testbed, folder: Path, **overrides: Any
) -> Settings:
    """Return the settings of a test server that scans with the bed's Trivy and fixture DB."""
    return Settings(
        database_url=database.url,
        secret_key=TEST_SECRET_KEY,
        data_dir=folder,
        scanner={
            "trivy_bin": testbed.env["TRIVY_BIN"],
            "cache_dir": testbed.env["SECAPI_TEST_TRIVY_CACHE"],
            "offline": True,
            "insecure_registries": True,
        },
        **overrides,
    )


@pytest.fixture(scope="module")
def server(
    database: Database, testbed: Testbed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server for the module's tests, each of which registers a user of its own."""
    folder = tmp_path_factory.mktemp("server")
    settings = server_settings(database, testbed, folder, rate_limit_enabled=False)
    server = start_server(settings, folder / "server.log")
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def api_key(server: Server) -> str:
    response = httpx.post(f"{server.url}/api/v1/auth/register", json={"email": new_email()})
    assert response.status_code == 201, response.text
    key: str = response.json()["api_key"]
    return key


def scan_command(
    *args: str, server: Server, api_key: str | None
) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SECAPI_")}
    if api_key is not None:
        env["CI_SECAPI_KEY"] = api_key
    result = subprocess.run(
        [SECAPI, "scan", *args, "--url", server.url, "--api-key-env", "CI_SECAPI_KEY"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if api_key is not None:
        assert api_key not in result.stdout
        assert api_key not in result.stderr
    return result


def test_findings_at_threshold_exit_one(server: Server, api_key: str, registry: str) -> None:
    result = scan_command(
        f"{registry}/{ALPINE}", "--wait", "--fail-on", "high", server=server, api_key=api_key
    )

    assert result.returncode == 1, result.stderr
    assert "6 vulnerabilities at HIGH or above:" in result.stderr
    assert "0 critical, 6 high, 6 medium, 0 low, 0 unknown" in result.stdout
    listed = [line.split() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(listed) == 6, result.stderr
    assert ["HIGH", "CVE-2023-0286", "in", "libcrypto3", "3.0.7-r0"] in listed
    assert {line[0] for line in listed} == {"HIGH"}
    assert {line[3] for line in listed} == {"libcrypto3", "libssl3"}
    assert "more" not in result.stderr
    assert "CVE-2023-0286" in result.stdout
    # Only findings at the threshold or above are listed.
    assert "CVE-2022-4304" not in result.stdout


def test_findings_below_threshold_exit_zero(server: Server, api_key: str, registry: str) -> None:
    result = scan_command(
        f"{registry}/{ALPINE}", "--fail-on", "CRITICAL", server=server, api_key=api_key
    )

    assert result.returncode == 0, result.stderr
    assert "completed" in result.stdout


def test_secret_counts_toward_threshold(server: Server, api_key: str, registry: str) -> None:
    result = scan_command(
        f"{registry}/{SECRET}", "--fail-on", "CRITICAL", server=server, api_key=api_key
    )

    assert result.returncode == 1, result.stderr
    assert "2 secrets at CRITICAL or above" in result.stderr
    assert "CRITICAL secret github-pat in /srv/app/deploy.env:3" in result.stderr
    assert "CRITICAL secret aws-access-key-id in /srv/app/deploy.env:4" in result.stderr


def test_offending_findings_capped(server: Server, api_key: str, registry: str) -> None:
    # Every one of the image's 3,200 vulnerabilities is at UNKNOWN or above.
    result = scan_command(
        f"{registry}/fixtures/many-findings:1.0",
        "--fail-on",
        "UNKNOWN",
        "--format",
        "json",
        server=server,
        api_key=api_key,
    )

    assert result.returncode == 1, result.stderr
    assert "3200 vulnerabilities at UNKNOWN or above:" in result.stderr
    listed = [line for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(listed) == 21, result.stderr
    assert listed[-1] == "  ... and 3180 more"
    # The package path distinguishes the 160 copies of each package.
    assert "(srv/app-" in listed[0], listed[0]
    ranks = ["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]
    severities = [ranks.index(line.split()[0]) for line in listed[:-1]]
    assert severities == sorted(severities), "listed most severe first"


def test_format_option_has_help() -> None:
    result = subprocess.run(
        [SECAPI, "scan", "--help"], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    assert "--format {table,json} output on stdout: table" in help_text
    assert "json (the scan as GET /api/v1/scans/ID returns it" in help_text


def test_unreachable_server_names_url() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe socket is closed.
    url = f"http://127.0.0.1:{port}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("SECAPI_")}
    env["CI_SECAPI_KEY"] = "sk_0000000000_" + "A" * 43

    result = subprocess.run(
        [SECAPI, "scan", "alpine:3.20", "--url", url, "--api-key-env", "CI_SECAPI_KEY"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert f"cannot reach a SecAPI server at {url}" in result.stderr
    assert "--url or SECAPI_URL" in result.stderr
    assert "the server is running" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_output(server: Server, api_key: str, registry: str) -> None:
    result = scan_command(
        f"{registry}/{ALPINE}", "--wait", "--format", "json", server=server, api_key=api_key
    )

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["status"] == "completed"
    assert len(document["results"]["vulnerabilities"]) == 12


def test_failed_scan_exit_two(server: Server, api_key: str, registry: str) -> None:
    result = scan_command(
        f"{registry}/fixtures/absent:1.0",
        "--wait",
        "--fail-on",
        "LOW",
        server=server,
        api_key=api_key,
    )

    assert result.returncode == 2
    assert "secapi: scan " in result.stderr
    assert "failed: ImageNotFound: " in result.stderr
    assert result.stdout == ""


def test_submit_without_wait(server: Server, api_key: str, registry: str) -> None:
    result = scan_command(f"{registry}/{ALPINE}", server=server, api_key=api_key)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("scan ")
    assert "submitted" in result.stdout


def test_invalid_reference_exit_two(server: Server, api_key: str) -> None:
    result = scan_command("Not A Reference", "--wait", server=server, api_key=api_key)

    assert result.returncode == 2
    assert "422" in result.stderr


def test_missing_key_exit_two(server: Server) -> None:
    result = scan_command("alpine:3.19", "--wait", server=server, api_key=None)

    assert result.returncode == 2
    assert "CI_SECAPI_KEY" in result.stderr


def test_rejected_key_exit_two(server: Server) -> None:
    wrong = "sk_0000000000_" + "A" * 43
    result = scan_command("alpine:3.19", "--wait", server=server, api_key=wrong)

    assert result.returncode == 2
    assert "401" in result.stderr


def test_wait_timeout_exit_two(server: Server, api_key: str, registry: str) -> None:
    result = scan_command(
        f"{registry}/{ALPINE}", "--wait", "--timeout", "0", server=server, api_key=api_key
    )

    assert result.returncode == 2
    assert "did not end within" in result.stderr


def test_table_names_paths_and_rows_left_out(server: Server, api_key: str, registry: str) -> None:
    result = scan_command(
        f"{registry}/fixtures/many-findings:1.0", "--wait", server=server, api_key=api_key
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("SEVERITY"))
    assert header.split() == [
        "SEVERITY",
        "ID",
        "PACKAGE",
        "INSTALLED_VERSION",
        "FIXED_VERSION",
        "PATH",
    ]
    rows = lines[lines.index(header) + 1 : -1]
    assert len(rows) == 100
    assert len({row.split()[-1] for row in rows}) == 100, "every row has its own path"
    assert lines[-1].startswith("... and 3100 more; list them all with GET /api/v1/scans/")


def test_long_rate_limit_wait_fails_at_once(
    database: Database, testbed: Testbed, tmp_path: Path, registry: str
) -> None:
    """A 429 whose Retry-After is an hour ends the command instead of blocking the pipeline."""
    settings = server_settings(
        database,
        testbed,
        tmp_path,
        rate_limit_enabled=True,
        # In-memory limits of this server alone: the bed's Redis contains other tests' counts,
        # such as the registrations per hour from 127.0.0.1.
        redis_url=None,
        tiers={"free": {"scans_per_hour": 1}},
    )
    limited = start_server(settings, tmp_path / "server.log")
    try:
        response = httpx.post(f"{limited.url}/api/v1/auth/register", json={"email": new_email()})
        assert response.status_code == 201, response.text
        key = response.json()["api_key"]
        image = f"{registry}/{ALPINE}"

        first = scan_command(image, server=limited, api_key=key)
        second = scan_command(image, server=limited, api_key=key)
    finally:
        stop_server(limited)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 2, second.stderr
    assert "failed with status 429" in second.stderr
    assert "scan submissions per hour" in second.stderr
    assert "retrying" not in second.stderr
    # A log written to a file has no terminal colour codes.
    assert "\x1b[" not in (tmp_path / "server.log").read_text()


def test_wait_survives_server_restart(testbed: Testbed, tmp_path: Path) -> None:
    """A waiting `secapi scan` tries again while the server restarts, and reports the end."""
    # A database of its own: the module's server would otherwise take the requeued scan.
    database = Database(url=f"sqlite:///{tmp_path / 'restart.db'}", backend="sqlite")
    settings = server_settings(database, testbed, tmp_path, rate_limit_enabled=False)
    scanner = settings.scanner.model_copy(update={"timeout_seconds": 10})
    settings = settings.model_copy(update={"scanner": scanner})
    log_path = tmp_path / "server.log"
    first = start_server(settings, log_path)
    port = int(first.url.rsplit(":", 1)[1])
    second: Server | None = None
    client: subprocess.Popen[str] | None = None
    try:
        key = httpx.post(f"{first.url}/api/v1/auth/register", json={"email": new_email()})
        env = {name: value for name, value in os.environ.items() if not name.startswith("SECAPI_")}
        env["CI_SECAPI_KEY"] = key.json()["api_key"]
        with silent_server() as address:
            # Trivy waits on a registry that never responds, until the 10 s time limit.
            client = subprocess.Popen(
                [
                    *(SECAPI, "scan", f"{address}/hangs:1", "--wait", "--timeout", "180"),
                    *("--url", first.url, "--api-key-env", "CI_SECAPI_KEY"),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(2)
            stop_server(first)
            time.sleep(2)
            second = start_server(settings, log_path, port=port)
            stdout, stderr = client.communicate(timeout=150)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.communicate()
        stop_server(first)
        if second is not None:
            stop_server(second)

    assert client is not None
    assert "trying again" in stderr
    assert "cannot reach" not in stderr
    # The scan ran again on the restarted server and failed at its time limit.
    assert client.returncode == 2, stdout + stderr
    assert "time limit of 10 seconds" in stderr
