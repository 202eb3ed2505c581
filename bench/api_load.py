"""API throughput: submit and read scans under 16 concurrent clients, against a bare endpoint.

SecAPI runs as a `secapi serve` subprocess in its Kubernetes deployment
shape: PostgreSQL of the test bed (a database of its own), the "kubernetes"
executor creating one Scan resource per submission in a namespace of its own.
The 3,200-finding scan that the GET load reads is run first by a `secapi
operator` subprocess, which is stopped before the load starts, so the
submitted Scans stay Pending and no Trivy runs during the measurements.

The bare app (bench/bare_app.py) answers the same paths with FastAPI alone,
served by the same uvicorn arguments and logging setup. Its GET body is the
byte-for-byte body SecAPI returned for the scan. Rate limits are off
(RATE_LIMIT_ENABLED=false) and the user's concurrent-scan limit is lifted,
so every request does the full work of an accepted one.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Any

import httpx

from bench import client
from bench.bed import scratch_database
from bench.cluster import Cluster
from bench.context import RunContext, say
from bench.loadgen import run_wrk, wrk_version
from bench.results import PartResult, Target
from bench.servers import migrate, secapi_env, start_bare_app, start_operator, start_secapi
from bench.trivy import scanner_env

TITLE = "API throughput and latency"
CONNECTIONS = 16
LARGE_IMAGE = "fixtures/many-findings:1.0"
SUBMIT_IMAGE = "fixtures/alpine:3.17"
TARGET_SUBMIT_RATIO = 0.5
TARGET_GET_P99 = 0.1


def _prepare_large_scan(
    server_url: str,
    api_key: str,
    *,
    image: str,
    operator_env: dict[str, str],
    namespace: str,
    context: RunContext,
) -> tuple[str, bytes]:
    """Run the 3,200-finding scan through the operator; return its id and SecAPI's GET body."""
    operator = start_operator(
        "operator-api", namespace=namespace, env=operator_env, work_dir=context.work_dir
    )
    try:
        with client.api_client(server_url, api_key) as http:
            scan_id = client.submit(http, image)
            finished = client.wait_until_final(http, scan_id, interval=0.2, timeout=300)
            if finished.detail["status"] != "completed":
                raise RuntimeError(
                    f"the large scan ended {finished.detail['status']}: {finished.detail.get('message')}"
                )
            response = http.get(f"/api/v1/scans/{scan_id}")
            response.raise_for_status()
    finally:
        operator.stop()
    findings = len(response.json()["results"]["vulnerabilities"])
    say(
        f"api: large scan {scan_id} completed with {findings} findings, body {len(response.content)} bytes"
    )
    return scan_id, response.content


def _load(
    url: str,
    *,
    method: str,
    body: str = "",
    api_key: str = "",
    seconds: int,
    server_pid: int,
    warmup_seconds: int,
) -> dict[str, Any]:
    if warmup_seconds:
        run_wrk(
            url,
            method=method,
            body=body,
            api_key=api_key,
            connections=CONNECTIONS,
            duration_seconds=warmup_seconds,
            server_pid=server_pid,
        )
    summary = run_wrk(
        url,
        method=method,
        body=body,
        api_key=api_key,
        connections=CONNECTIONS,
        duration_seconds=seconds,
        server_pid=server_pid,
    )
    if summary["expected_status"] != summary["responses"]:
        raise RuntimeError(
            f"{method} {url}: {summary['responses'] - summary['expected_status']} of "
            f"{summary['responses']} responses had an unexpected status"
        )
    return summary


def _latency_ms(summary: dict[str, Any], key: str) -> float:
    return float(summary["latency_us"][key]) / 1000


def run(context: RunContext) -> PartResult:
    bed = context.bed
    seconds = context.scale(10, 3)
    warmup = context.scale(2, 1)
    cluster = Cluster(bed.kubeconfig)
    figures: dict[str, Any] = {
        "connections": CONNECTIONS,
        "seconds_per_load": seconds,
        "load_generator": f"{wrk_version()}, 1 thread",
    }
    with ExitStack() as stack:
        stack.callback(cluster.close)
        cluster.ensure_crd()
        database_url = stack.enter_context(scratch_database(bed, "secapi_bench_api"))
        namespace = stack.enter_context(cluster.namespace("secapi-bench-api"))
        env = secapi_env(
            {
                "DATABASE_URL": database_url,
                "KUBECONFIG": str(bed.kubeconfig),
                "SECAPI_EXECUTOR": "kubernetes",
                "SECAPI_NAMESPACE": namespace,
                "SECAPI_TIERS__FREE__CONCURRENT_SCANS": "0",
                "SECAPI_TIERS__FREE__SCANS_PER_HOUR": "0",
                "SECAPI_TIERS__FREE__REQUESTS_PER_MINUTE": "0",
                # Setting one field of a tier from the environment requires all of them.
                "SECAPI_TIERS__FREE__QUEUE_PRIORITY": "0",
                **scanner_env(bed, max_concurrent_scans=1),
            }
        )
        migrate(env)
        server = start_secapi("api-secapi", env=env, work_dir=context.work_dir)
        stack.callback(server.stop)
        api_key = client.register(server.url, label="api")
        scan_id, document = _prepare_large_scan(
            server.url,
            api_key,
            image=bed.image(LARGE_IMAGE),
            operator_env=env,
            namespace=namespace,
            context=context,
        )
        document_path = context.work_dir / "api-document.json"
        document_path.write_bytes(document)
        bare = start_bare_app("api-bare", document=document_path, work_dir=context.work_dir)
        stack.callback(bare.stop)
        _check_same_shape(bare.url, document)

        submit_body = json.dumps({"image": bed.image(SUBMIT_IMAGE)})
        runs = {}
        for name, service, method, path, key in (
            ("bare_submit", bare, "POST", "/api/v1/scan/docker", ""),
            ("secapi_submit", server, "POST", "/api/v1/scan/docker", api_key),
            ("secapi_get", server, "GET", f"/api/v1/scans/{scan_id}", api_key),
            ("bare_get", bare, "GET", f"/api/v1/scans/{scan_id}", ""),
        ):
            runs[name] = _load(
                service.url + path,
                method=method,
                body=submit_body if method == "POST" else "",
                api_key=key,
                seconds=seconds,
                server_pid=service.process.pid,
                warmup_seconds=warmup,
            )
            say(
                f"api: {name}: {runs[name]['requests_per_second']:.0f} requests/s, "
                f"p99 {_latency_ms(runs[name], 'p99'):.1f} ms"
            )
            time.sleep(1)
        figures["runs"] = runs
        figures["document_bytes"] = len(document)
        figures["scan_resources_created"] = len(cluster.list_scans(namespace))

    submit_ratio = (
        runs["secapi_submit"]["requests_per_second"] / runs["bare_submit"]["requests_per_second"]
    )
    get_ratio = runs["secapi_get"]["requests_per_second"] / runs["bare_get"]["requests_per_second"]
    figures["submit_throughput_ratio"] = round(submit_ratio, 3)
    figures["get_throughput_ratio"] = round(get_ratio, 3)
    rows = []
    for name, label in (
        ("bare_submit", "bare POST"),
        ("secapi_submit", "SecAPI POST /api/v1/scan/docker"),
        ("bare_get", "bare GET"),
        ("secapi_get", "SecAPI GET /api/v1/scans/{id} (3,200 findings)"),
    ):
        item = runs[name]
        rows.append(
            (
                f"{label}: requests/s, latency p50 / p99",
                f"{item['requests_per_second']:.0f}/s, {_latency_ms(item, 'p50'):.1f} / "
                f"{_latency_ms(item, 'p99'):.1f} ms (server CPU {item['server_cpu_seconds']} s, "
                f"wrk CPU {item['wrk_cpu_seconds']} s)",
            )
        )
    rows += [
        ("submit throughput SecAPI / bare", f"{submit_ratio:.3f}"),
        ("GET throughput SecAPI / bare", f"{get_ratio:.3f}"),
        ("GET body", f"{len(document) / 1024:.0f} KiB"),
    ]
    targets = [
        Target("submit throughput SecAPI / bare", submit_ratio, ">=", TARGET_SUBMIT_RATIO),
        Target("GET p99", _latency_ms(runs["secapi_get"], "p99") / 1000, "<", TARGET_GET_P99, "s"),
    ]
    method = [
        "`secapi serve` subprocess: PostgreSQL, executor kubernetes (one Scan resource per "
        "submission, no operator running), RATE_LIMIT_ENABLED=false and no per-user scan "
        "limits. Bare app: FastAPI only, same uvicorn arguments and logging, same GET body.",
        f"Load: {figures['load_generator']}, {CONNECTIONS} connections (keep-alive), "
        f"{warmup} s warm-up then {seconds} s measured per run; runs in the order bare POST, "
        "SecAPI POST, SecAPI GET, bare GET, all to 127.0.0.1.",
        'POST body: `{"image": "<registry>/fixtures/alpine:3.17"}`; GET: the full scan with '
        "its results document, without Accept-Encoding (as curl sends it).",
    ]
    return PartResult(
        part="api", title=TITLE, method=method, figures=figures, rows=rows, targets=targets
    )


def _check_same_shape(bare_url: str, document: bytes) -> None:
    response = httpx.get(f"{bare_url}/api/v1/scans/any", timeout=30)
    if response.content != document:
        raise RuntimeError("the bare app does not return the document it was given")
