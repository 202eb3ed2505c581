"""The bare FastAPI endpoints that SecAPI's API is measured against.

They do what a FastAPI endpoint does at least for the same requests: parse
and validate the JSON body and answer 202 with a small JSON body, and answer
a GET with a document of the same size as SecAPI's, held in memory. No
authentication, no database. They are served exactly as `secapi serve` serves
SecAPI: uvicorn with the same arguments, the same number of worker processes
and the same logging setup (`secapi.cli.configure_logging`), so only the
application differs.

Run: `python -m bench.bare_app --port PORT --document FILE [--workers N]`.
"""

from __future__ import annotations

import argparse
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Response, status
from pydantic import BaseModel, ConfigDict, Field

from secapi.cli import configure_logging

# Environment variable naming the GET body's file, for worker processes that build the app.
DOCUMENT_VARIABLE = "BENCH_BARE_DOCUMENT"


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=512)


class SubmitAccepted(BaseModel):
    scan_id: str
    status: str
    image: str
    created_at: datetime


def create_app(document: bytes) -> FastAPI:
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

    return app


def create_app_from_environment() -> FastAPI:
    """Build the app in a uvicorn worker process, with the document that main() names."""
    return create_app(Path(os.environ[DOCUMENT_VARIABLE]).read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--document", type=Path, required=True, help="body of every GET answer")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()

    configure_logging(json_logs=False)
    # The same arguments as `secapi serve` passes (secapi/cli.py).
    if args.workers == 1:
        app = create_app(args.document.read_bytes())
        uvicorn.run(app, host="127.0.0.1", port=args.port, proxy_headers=False, log_config=None)
        return
    os.environ[DOCUMENT_VARIABLE] = str(args.document.resolve())
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
