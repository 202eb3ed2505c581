"""The bare FastAPI endpoints that SecAPI's API is measured against.

They do what a FastAPI endpoint does at least for the same requests: parse
and validate the JSON body and answer 202 with a small JSON body, and answer
a GET with a document of the same size as SecAPI's, held in memory. No
authentication, no database. They are served exactly as `secapi serve` serves
SecAPI: uvicorn with the same arguments, the same number of worker processes
and the same logging setup (`secapi.cli.configure_logging`), so only the
application differs.

With `--database-url` and `--namespace`, a third endpoint,
`POST /stored/api/v1/scan/docker`, also does the two writes that any durable
submission to the operator needs: it inserts a row into PostgreSQL (plain
SQLAlchemy Core, committed) and then creates a Scan resource with the official
Kubernetes client, in a thread because that client blocks. It has no
authentication, rate limits, audit trail or checks of its own.

With `--trivy-command`, two more endpoints run Trivy the way the embedded
API does, with nothing around it: `POST /trivy/api/v1/scan/docker` starts the
given command for the image and responds with 202, and `GET
/trivy/api/v1/scans/{id}?wait=SECONDS` responds when that process exits, after
reading its report file. No database, no checks. They show how close to bare
Trivy any FastAPI service that runs Trivy per request can come.

Run: `python -m bench.bare_app --port PORT --document FILE [--workers N]
[--database-url URL --namespace NAME] [--trivy-command JSON]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI, HTTPException, Response, status
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import create_async_engine

from secapi.cli import configure_logging
from secapi.core.executors.scan_resource import API_VERSION, GROUP, KIND, PLURAL, VERSION

# Environment variables of the app's settings, for worker processes that build the app.
DOCUMENT_VARIABLE = "BENCH_BARE_DOCUMENT"
DATABASE_VARIABLE = "BENCH_BARE_DATABASE_URL"
NAMESPACE_VARIABLE = "BENCH_BARE_NAMESPACE"
TRIVY_VARIABLE = "BENCH_BARE_TRIVY_COMMAND"
# Path prefix of the endpoints that run Trivy, and the placeholders of their command.
TRIVY_PREFIX = "/trivy"
IMAGE_PLACEHOLDER = "{image}"
OUTPUT_PLACEHOLDER = "{output}"
# Path prefix of the endpoint that stores each submission.
STORED_PREFIX = "/stored"
# Label on the Scan resources the stored endpoint creates, so the benchmark can count them.
STORED_LABEL = "bench.secapi.io/bare"

metadata = sa.MetaData()
bare_scans = sa.Table(
    "bare_scans",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("image", sa.String(512), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=512)


class SubmitAccepted(BaseModel):
    scan_id: str
    status: str
    image: str
    created_at: datetime


def _scan_resource(scan_id: str, image: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": f"bare-{scan_id}",
            "namespace": namespace,
            "labels": {STORED_LABEL: "true"},
        },
        "spec": {
            "image": image,
            "scanners": ["vuln", "secret"],
            "severities": ["UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL"],
            "ignoreUnfixed": False,
        },
    }


def _add_stored_endpoint(app: FastAPI, *, database_url: str, namespace: str) -> None:
    # The same pool size as SecAPI's engine (secapi/core/db/engine.py).
    engine = create_async_engine(database_url, pool_size=20, max_overflow=10)
    configuration = k8s.Configuration()
    # The client reads KUBECONFIG once, at import, so pass the variable's current value.
    k8s_config.load_kube_config(
        config_file=os.environ.get("KUBECONFIG") or None,
        client_configuration=configuration,
        persist_config=False,
    )
    custom = k8s.CustomObjectsApi(k8s.ApiClient(configuration))

    @app.post(f"{STORED_PREFIX}/api/v1/scan/docker", status_code=status.HTTP_202_ACCEPTED)
    async def submit_stored(body: SubmitRequest, response: Response) -> SubmitAccepted:
        scan_id = str(uuid.uuid4())
        created_at = datetime.now(UTC)
        async with engine.begin() as connection:
            await connection.execute(
                bare_scans.insert().values(
                    id=scan_id, image=body.image, status="pending", created_at=created_at
                )
            )
        await asyncio.to_thread(
            custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            _scan_resource(scan_id, body.image, namespace),
        )
        response.headers["Location"] = f"/api/v1/scans/{scan_id}"
        return SubmitAccepted(
            scan_id=scan_id, status="pending", image=body.image, created_at=created_at
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app.router.lifespan_context = lifespan


def _add_trivy_endpoints(app: FastAPI, command: list[str]) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="secapi-bench-bare-trivy-"))
    # Started processes by scan id, with their report file and start time.
    runs: dict[str, tuple[asyncio.subprocess.Process, Path, datetime]] = {}

    @app.post(f"{TRIVY_PREFIX}/api/v1/scan/docker", status_code=status.HTTP_202_ACCEPTED)
    async def submit_trivy(body: SubmitRequest, response: Response) -> SubmitAccepted:
        scan_id = str(uuid.uuid4())
        created_at = datetime.now(UTC)
        output = scratch / f"{scan_id}.json"
        arguments = [
            part.replace(IMAGE_PLACEHOLDER, body.image).replace(OUTPUT_PLACEHOLDER, str(output))
            for part in command
        ]
        process = await asyncio.create_subprocess_exec(
            *arguments, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        runs[scan_id] = (process, output, created_at)
        response.headers["Location"] = f"{TRIVY_PREFIX}/api/v1/scans/{scan_id}"
        return SubmitAccepted(
            scan_id=scan_id, status="running", image=body.image, created_at=created_at
        )

    @app.get(f"{TRIVY_PREFIX}/api/v1/scans/{{scan_id}}")
    async def get_trivy(scan_id: str, wait: int = 0, include_findings: bool = True) -> Any:
        run = runs.get(scan_id)
        if run is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"scan {scan_id} not found: it was never submitted here, or its end was "
                "already reported",
            )
        process, output, created_at = run
        if wait > 0:
            try:
                await asyncio.wait_for(process.wait(), timeout=wait)
            except TimeoutError:
                pass
        if process.returncode is None:
            return {"scan_id": scan_id, "status": "running", "created_at": created_at}
        completed_at = datetime.now(UTC)
        del runs[scan_id]
        report = output.read_bytes() if output.exists() else b""
        output.unlink(missing_ok=True)
        return {
            "scan_id": scan_id,
            "status": "completed" if process.returncode == 0 else "failed",
            "created_at": created_at,
            "completed_at": completed_at,
            "report_bytes": len(report),
        }


def create_stored_table(database_url: str) -> None:
    """Create the stored endpoint's table, once, before the worker processes start."""
    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        metadata.create_all(connection)
    engine.dispose()


def create_app(
    document: bytes,
    *,
    database_url: str | None = None,
    namespace: str | None = None,
    trivy_command: list[str] | None = None,
) -> FastAPI:
    app = FastAPI(title="bare")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/scan/docker", status_code=status.HTTP_202_ACCEPTED)
    async def submit(body: SubmitRequest, response: Response) -> SubmitAccepted:
        scan_id = str(uuid.uuid4())
        response.headers["Location"] = f"/api/v1/scans/{scan_id}"
        return SubmitAccepted(
            scan_id=scan_id, status="pending", image=body.image, created_at=datetime.now(UTC)
        )

    @app.get("/api/v1/scans/{scan_id}")
    async def get_scan(scan_id: str) -> Response:
        return Response(content=document, media_type="application/json")

    if database_url and namespace:
        _add_stored_endpoint(app, database_url=database_url, namespace=namespace)
    if trivy_command:
        _add_trivy_endpoints(app, trivy_command)
    return app


def create_app_from_environment() -> FastAPI:
    """Build the app in a uvicorn worker process, with the settings that main() passes on."""
    return create_app(
        Path(os.environ[DOCUMENT_VARIABLE]).read_bytes(),
        database_url=os.environ.get(DATABASE_VARIABLE),
        namespace=os.environ.get(NAMESPACE_VARIABLE),
        trivy_command=json.loads(os.environ.get(TRIVY_VARIABLE) or "null"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--document", type=Path, required=True, help="body of every GET answer")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument(
        "--database-url", help="SQLAlchemy URL of the stored endpoint's PostgreSQL database"
    )
    parser.add_argument("--namespace", help="namespace of the stored endpoint's Scan resources")
    parser.add_argument(
        "--trivy-command",
        type=json.loads,
        help=f"JSON list: the Trivy command line, with {IMAGE_PLACEHOLDER} and "
        f"{OUTPUT_PLACEHOLDER} where the image and the report file go",
    )
    args = parser.parse_args()
    if bool(args.database_url) != bool(args.namespace):
        parser.error("--database-url and --namespace go together; pass both or neither")

    configure_logging(json_logs=False)
    if args.database_url:
        create_stored_table(args.database_url)
    # The same arguments as `secapi serve` passes (secapi/cli.py).
    if args.workers == 1:
        app = create_app(
            args.document.read_bytes(),
            database_url=args.database_url,
            namespace=args.namespace,
            trivy_command=args.trivy_command,
        )
        uvicorn.run(app, host="127.0.0.1", port=args.port, proxy_headers=False, log_config=None)
        return
    os.environ[DOCUMENT_VARIABLE] = str(args.document.resolve())
    if args.database_url:
        os.environ[DATABASE_VARIABLE] = args.database_url
        os.environ[NAMESPACE_VARIABLE] = args.namespace
    if args.trivy_command:
        os.environ[TRIVY_VARIABLE] = json.dumps(args.trivy_command)
    uvicorn.run(
        "bench.bare_app:create_app_from_environment",
        factory=True,
        workers=args.workers,
        host="127.0.0.1",
        port=args.port,
        proxy_headers=False,
        log_config=None,
    )


if __name__ == "__main__":
    main()
