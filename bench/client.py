"""The few SecAPI requests the benchmarks make: register, submit, poll."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

FINAL_STATUSES = ("completed", "failed")


def register(base_url: str, *, label: str) -> str:
    """Register a new user and return its API key."""
    email = f"bench-{label}-{uuid.uuid4().hex[:8]}@example.com"
    response = httpx.post(f"{base_url}/api/v1/auth/register", json={"email": email}, timeout=30)
    if response.status_code != 201:
        raise RuntimeError(
            f"registration failed with {response.status_code}: {response.text[:300]}"
        )
    return str(response.json()["api_key"])


def submit(client: httpx.Client, image: str) -> str:
    """Submit a scan of `image` and return its id."""
    response = client.post("/api/v1/scan/docker", json={"image": image})
    if response.status_code != 202:
        raise RuntimeError(
            f"submitting {image} failed with {response.status_code}: {response.text[:300]}"
        )
    return str(response.json()["scan_id"])


@dataclass(frozen=True)
class Finished:
    detail: dict[str, Any]
    # perf_counter() when the response that showed the final status arrived.
    received_at: float
    polls: int


def wait_until_final(
    client: httpx.Client,
    scan_id: str,
    *,
    interval: float,
    timeout: float = 300.0,
    long_poll: int = 0,
) -> Finished:
    """Poll the scan every `interval` seconds until it is completed or failed.

    Polls start at a fixed rate, not `interval` after the previous response, so
    the time a poll takes does not stretch the period. With `long_poll`, each
    GET asks the server to hold the answer up to that many seconds (`wait`),
    and the server answers as soon as the scan ends.
    """
    deadline = time.perf_counter() + timeout
    next_poll = time.perf_counter()
    polls = 0
    params = {"include_findings": "false"}
    if long_poll:
        params["wait"] = str(long_poll)
    while True:
        response = client.get(f"/api/v1/scans/{scan_id}", params=params)
        received_at = time.perf_counter()
        polls += 1
        if response.status_code != 200:
            raise RuntimeError(
                f"GET scan {scan_id} failed with {response.status_code}: {response.text[:300]}"
            )
        detail = response.json()
        if detail["status"] in FINAL_STATUSES:
            return Finished(detail=detail, received_at=received_at, polls=polls)
        if received_at > deadline:
            raise TimeoutError(f"scan {scan_id} is still {detail['status']} after {timeout:g} s")
        next_poll = max(next_poll + interval, time.perf_counter())
        time.sleep(max(0.0, next_poll - time.perf_counter()))


def api_client(base_url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"X-API-Key": api_key}, timeout=60)
