"""Run schemathesis against a real `secapi serve`, inside a network namespace of its own.

Started by test_openapi.py as `unshare -n python schemathesis_run.py WORKDIR`.
The namespace has only a loopback interface, so the Trivy processes that
fuzzed scan requests start cannot reach any registry outside this machine,
whatever image names schemathesis invents: they fail fast, as scans should.
The server uses DATABASE_URL when it is set (the bed's PostgreSQL through its
Unix socket, which the namespace does not cut off) and SQLite otherwise, with
in-memory limits, since the bed's Redis listens in the parent namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

PORT = 8000
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "ignored_auth",
    ]
)


def main(workdir: Path) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    secapi = str(Path(sys.executable).parent / "secapi")
    env = {
        **os.environ,
        "DATABASE_URL": os.environ.get("DATABASE_URL") or f"sqlite:///{workdir / 'secapi.db'}",
        "SECAPI_DATA_DIR": str(workdir),
        "SECRET_KEY": "schemathesis-" + "s" * 40,
        "RATE_LIMIT_ENABLED": "false",
    }
    env.pop("REDIS_URL", None)
    log = (workdir / "server.log").open("wb")
    server = subprocess.Popen(
        [secapi, "serve", "--host", "127.0.0.1", "--port", str(PORT)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{PORT}"
        _wait_until_healthy(url, server)
        key = httpx.post(
            f"{url}/api/v1/auth/register", json={"email": "fuzzer@example.com"}
        ).json()["api_key"]
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{url}/openapi.json",
                "--header",
                f"X-API-Key: {key}",
                "--checks",
                CHECKS,
                "--max-examples",
                os.environ.get("SECAPI_FUZZ_EXAMPLES", "25"),
                "--seed",
                "20240101",
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--no-color",
                "--generation-database",
                "none",
                "--report",
                "junit",
                "--report-dir",
                str(workdir / "report"),
            ],
            check=False,
            # Schemathesis keeps a crash cache in its working folder; keep it out of the repository.
            cwd=workdir,
        )
        return result.returncode
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _wait_until_healthy(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"secapi serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("secapi serve did not answer /health within 60 s")


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
