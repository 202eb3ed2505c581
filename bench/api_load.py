"""API throughput: submit and read scans under 16 concurrent clients, against a bare endpoint.

SecAPI runs as a `secapi serve` subprocess in its Kubernetes deployment
shape: PostgreSQL of the test bed (a database of its own), the "kubernetes"
executor creating one Scan resource per submission in a namespace of its own.
The 3,200-finding scan that the GET load reads is run first by a `secapi
operator` subprocess, which is stopped before the load starts, so the
submitted Scans stay Pending and no Trivy runs during the measurements.

The bare app (bench/bare_app.py) serves the same paths with FastAPI alone,
served by the same uvicorn arguments and logging setup. Its GET body is the
byte-for-byte body SecAPI returned for the scan. Its second submit endpoint,
"stored", also inserts a row into PostgreSQL and creates a Scan resource, the
two writes any submission to the operator needs, so comparing SecAPI with it
shows what SecAPI's own checks and records cost. Rate limits are off
(RATE_LIMIT_ENABLED=false) and the user's concurrent-scan limit is lifted,
so every request does the full work of an accepted one.

The sides alternate in short rounds: bare then SecAPI, then the other way
round, and the three submit sides rotate. So a change in the machine's
background load hits all of them. Each figure is the median over the rounds.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Any

import httpx
import psutil

from bench import client, stats
from bench.bare_app import STORED_PREFIX
from bench.bed import scratch_database
from bench.cluster import Cluster
from bench.context import RunContext, say
from bench.loadgen import run_wrk, wrk_version
from bench.results import PartResult, Target
from bench.servers import (
    Service,
    migrate,
    secapi_env,
    start_bare_app,
    start_operator,
    start_secapi,
)
from bench.trivy import scanner_env

TITLE = "API throughput and latency"
CONNECTIONS = 16
# uvicorn worker processes of both SecAPI and the bare app, the same on both sides to be fair.
SERVER_WORKERS = 2
LARGE_IMAGE = "fixtures/many-findings:1.0"
SUBMIT_IMAGE = "fixtures/alpine:3.17"
TARGET_SUBMIT_RATIO = 0.5
TARGET_GET_P99 = 0.1
# Parts of the test bed whose CPU time is recorded during the submit loads that write.
CLUSTER_PROCESSES = ("kube-apiserver", "etcd", "postgres")
# Before a GET run: kube-apiserver, etcd and PostgreSQL count as idle below this share of
# one core over one sample, and the run starts anyway after the timeout.
QUIET_CPU_SHARE = 0.10
QUIET_SAMPLE_SECONDS = 0.5
QUIET_TIMEOUT_SECONDS = 30


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
                    f"the large scan ended {finished.detail['status']}: "
                    f"{finished.detail.get('message')}"
                )
            response = http.get(f"/api/v1/scans/{scan_id}")
            response.raise_for_status()
    finally:
        operator.stop()
    findings = len(response.json()["results"]["vulnerabilities"])
    say(
        f"api: scan {scan_id} completed with {findings} findings, body {len(response.content)} bytes"
    )
    return scan_id, response.content


def _check_same_body(bare_url: str, document: bytes) -> None:
    response = httpx.get(f"{bare_url}/api/v1/scans/any", timeout=30)
    if response.content != document:
        raise RuntimeError("the bare app does not return the document it was given")


class _Loads:
    """The four loads of this part, run in rounds that alternate the sides."""

    def __init__(
        self,
        *,
        secapi: Service,
        bare: Service,
        api_key: str,
        scan_id: str,
        submit_body: str,
        cluster_pids: dict[str, int],
    ) -> None:
        self.secapi = secapi
        self.bare = bare
        self.api_key = api_key
        self.scan_id = scan_id
        self.submit_body = submit_body
        self.cluster_pids = cluster_pids
        self.runs: dict[str, list[dict[str, Any]]] = {
            "bare_submit": [],
            "stored_submit": [],
            "secapi_submit": [],
            "bare_get": [],
            "secapi_get": [],
        }

    def wait_for_quiet_cluster(self) -> None:
        """Wait until kube-apiserver, etcd and PostgreSQL are idle after the submissions' writes.

        A GET run that starts while they still work on the Scans just created
        measures their load on the two cores as well as the GET.
        """
        processes = [psutil.Process(pid) for pid in self.cluster_pids.values()]
        deadline = time.monotonic() + QUIET_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            before = sum(sum(process.cpu_times()[:2]) for process in processes)
            time.sleep(QUIET_SAMPLE_SECONDS)
            after = sum(sum(process.cpu_times()[:2]) for process in processes)
            if (after - before) / QUIET_SAMPLE_SECONDS < QUIET_CPU_SHARE:
                return
        say(f"api: the cluster processes were still busy after {QUIET_TIMEOUT_SECONDS} s")

    def one(self, name: str, *, seconds: float, record: bool = True) -> None:
        side, kind = name.split("_")
        if kind == "get":
            self.wait_for_quiet_cluster()
        service = self.secapi if side == "secapi" else self.bare
        processes = {"server": service.process.pid}
        # With several uvicorn workers the requests are served by the children.
        for index, child in enumerate(psutil.Process(service.process.pid).children(), start=1):
            processes[f"server child {index}"] = child.pid
        if name in ("secapi_submit", "stored_submit"):
            processes.update(self.cluster_pids)
        prefix = STORED_PREFIX if side == "stored" else ""
        if kind == "submit":
            url, method, body = (
                f"{service.url}{prefix}/api/v1/scan/docker",
                "POST",
                self.submit_body,
            )
        else:
            url, method, body = service.url + f"/api/v1/scans/{self.scan_id}", "GET", ""
        summary = run_wrk(
            url,
            method=method,
            body=body,
            api_key=self.api_key if side == "secapi" else "",
            connections=CONNECTIONS,
            duration_seconds=seconds,
            processes=processes,
        )
        if summary["expected_status"] != summary["responses"] or summary["socket_errors"]:
            raise RuntimeError(
                f"{name}: {summary['responses'] - summary['expected_status']} of "
                f"{summary['responses']} responses had an unexpected status, "
                f"{summary['socket_errors']} socket errors"
            )
        if record:
            self.runs[name].append(summary)

    def rounds(self, count: int, *, seconds: float, warmup: float) -> None:
        for name in self.runs:
            self.one(name, seconds=warmup, record=False)
        submit_sides = ["bare", "stored", "secapi"]
        for index in range(count):
            get_sides = ("bare", "secapi") if index % 2 == 0 else ("secapi", "bare")
            for side in submit_sides:
                self.one(f"{side}_submit", seconds=seconds)
            for side in get_sides:
                self.one(f"{side}_get", seconds=seconds)
            submit_sides = submit_sides[1:] + submit_sides[:1]
            say(
                f"api: round {index + 1}/{count}: submit "
                f"{self.runs['secapi_submit'][-1]['requests_per_second']:.0f}/s against "
                f"{self.runs['bare_submit'][-1]['requests_per_second']:.0f}/s bare and "
                f"{self.runs['stored_submit'][-1]['requests_per_second']:.0f}/s stored, GET p99 "
                f"{self.runs['secapi_get'][-1]['latency_us']['p99'] / 1000:.0f} ms"
            )


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    requests = sum(run["requests"] for run in runs)
    cpu_names = {name for run in runs for name in run["cpu_seconds"]}
    return {
        "rounds": len(runs),
        "requests": requests,
        "requests_per_second": stats.summarize(
            [run["requests_per_second"] for run in runs], digits=1
        ),
        "latency_ms_p50": stats.summarize(
            [run["latency_us"]["p50"] / 1000 for run in runs], digits=2
        ),
        "latency_ms_p99": stats.summarize(
            [run["latency_us"]["p99"] / 1000 for run in runs], digits=2
        ),
        "cpu_ms_per_request": {
            name: round(sum(run["cpu_seconds"].get(name, 0.0) for run in runs) / requests * 1000, 3)
            for name in sorted(cpu_names)
        },
        "non_2xx": sum(run["non_2xx"] for run in runs),
        "timeouts": sum(run["timeouts"] for run in runs),
        "per_round": [
            {
                key: run[key]
                for key in ("requests", "requests_per_second", "latency_us", "cpu_seconds")
            }
            for run in runs
        ],
    }


def run(context: RunContext) -> PartResult:
    bed = context.bed
    rounds = context.scale(5, 1)
    seconds = context.scale(5, 2)
    warmup = context.scale(2, 1)
    cluster = Cluster(bed.kubeconfig)
    cluster_pids = {name: pid for name in CLUSTER_PROCESSES if (pid := bed.process_pid(name))}
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
                # No per-user limits: setting one field of a tier requires all of them.
                "SECAPI_TIERS__FREE__CONCURRENT_SCANS": "0",
                "SECAPI_TIERS__FREE__SCANS_PER_HOUR": "0",
                "SECAPI_TIERS__FREE__REQUESTS_PER_MINUTE": "0",
                "SECAPI_TIERS__FREE__QUEUE_PRIORITY": "0",
                **scanner_env(bed, max_concurrent_scans=1),
            }
        )
        migrate(env)
        server = start_secapi(
            "api-secapi", env=env, work_dir=context.work_dir, workers=SERVER_WORKERS
        )
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
        bare = start_bare_app(
            "api-bare",
            document=document_path,
            work_dir=context.work_dir,
            workers=SERVER_WORKERS,
            database_url=database_url.replace("postgresql://", "postgresql+psycopg://", 1),
            namespace=namespace,
        )
        stack.callback(bare.stop)
        _check_same_body(bare.url, document)

        loads = _Loads(
            secapi=server,
            bare=bare,
            api_key=api_key,
            scan_id=scan_id,
            submit_body=json.dumps({"image": bed.image(SUBMIT_IMAGE)}),
            cluster_pids=cluster_pids,
        )
        loads.rounds(rounds, seconds=seconds, warmup=warmup)
        resources = cluster.list_scans(namespace)
        stored_resources = sum(item["metadata"]["name"].startswith("bare-") for item in resources)

    figures: dict[str, Any] = {
        "connections": CONNECTIONS,
        "load_generator": f"{wrk_version()}, 1 thread",
        "rounds": rounds,
        "seconds_per_run": seconds,
        "document_bytes": len(document),
        "scan_resources_created": {
            "secapi": len(resources) - stored_resources,
            "stored": stored_resources,
        },
    }
    for name, runs in loads.runs.items():
        figures[name] = _aggregate(runs)
    submit_ratios = [
        secapi["requests_per_second"] / bare["requests_per_second"]
        for secapi, bare in zip(loads.runs["secapi_submit"], loads.runs["bare_submit"], strict=True)
    ]
    get_ratios = [
        secapi["requests_per_second"] / bare["requests_per_second"]
        for secapi, bare in zip(loads.runs["secapi_get"], loads.runs["bare_get"], strict=True)
    ]
    stored_ratios = [
        secapi["requests_per_second"] / stored["requests_per_second"]
        for secapi, stored in zip(
            loads.runs["secapi_submit"], loads.runs["stored_submit"], strict=True
        )
    ]
    figures["submit_throughput_ratio"] = stats.summarize(submit_ratios)
    figures["submit_throughput_ratio_to_stored"] = stats.summarize(stored_ratios)
    figures["get_throughput_ratio"] = stats.summarize(get_ratios)
    get_p99 = figures["secapi_get"]["latency_ms_p99"]["p50"] / 1000

    rows = []
    for name, label in (
        ("bare_submit", "bare POST"),
        ("stored_submit", "stored POST (bare, plus a PostgreSQL row and a Scan resource)"),
        ("secapi_submit", "SecAPI POST /api/v1/scan/docker"),
        ("bare_get", "bare GET"),
        ("secapi_get", "SecAPI GET /api/v1/scans/{id} (3,200 findings)"),
    ):
        item = figures[name]
        cpu = ", ".join(f"{process} {ms:.2f}" for process, ms in item["cpu_ms_per_request"].items())
        rows.append(
            (
                f"{label}: requests/s, latency p50 / p99",
                f"{item['requests_per_second']['p50']:.0f}/s, {item['latency_ms_p50']['p50']:.1f} / "
                f"{item['latency_ms_p99']['p50']:.1f} ms",
            )
        )
        rows.append((f"{label}: CPU ms per request", cpu))
    rows += [
        (
            "submit throughput SecAPI / bare, median of rounds",
            f"{figures['submit_throughput_ratio']['p50']:.3f}",
        ),
        (
            "submit throughput SecAPI / stored, median of rounds",
            f"{figures['submit_throughput_ratio_to_stored']['p50']:.3f}",
        ),
        (
            "GET throughput SecAPI / bare, median of rounds",
            f"{figures['get_throughput_ratio']['p50']:.3f}",
        ),
        ("GET body", f"{len(document) / 1024:.0f} KiB"),
    ]
    targets = [
        Target(
            "submit throughput SecAPI / bare",
            figures["submit_throughput_ratio"]["p50"],
            ">=",
            TARGET_SUBMIT_RATIO,
        ),
        Target(
            "submit throughput SecAPI / stored (the same two writes, nothing else)",
            figures["submit_throughput_ratio_to_stored"]["p50"],
            ">=",
            TARGET_SUBMIT_RATIO,
        ),
        Target("GET p99", get_p99, "<", TARGET_GET_P99, "s"),
    ]
    method = [
        "`secapi serve` subprocess: PostgreSQL, executor kubernetes (one Scan resource per "
        "submission, no operator running), RATE_LIMIT_ENABLED=false and no per-user scan "
        "limits. Bare app: FastAPI only, same uvicorn arguments and logging, same GET body. "
        "Its stored POST also inserts a row with SQLAlchemy Core into PostgreSQL, commits, "
        "and creates a Scan resource with the official Kubernetes client in a thread: the "
        "writes every submission to the operator needs, without authentication, rate "
        "limits, audit events or checks. "
        f"Both run {SERVER_WORKERS} uvicorn worker processes (`secapi serve --workers "
        f"{SERVER_WORKERS}`). CPU is summed over the supervisor and its children.",
        f"Load: {figures['load_generator']}, {CONNECTIONS} keep-alive connections, to "
        f"127.0.0.1 only. {rounds} rounds of {seconds} s per load after {warmup} s of warm-up "
        "each; in every round the bare and SecAPI runs of each request alternate, the side "
        "that goes first changing each round. Figures are medians over rounds. Each GET run "
        f"starts once kube-apiserver, etcd and PostgreSQL use under {QUIET_CPU_SHARE:.0%} "
        f"of a core (at most {QUIET_TIMEOUT_SECONDS} s of waiting), so the writes of the "
        "submissions before it are not measured with it.",
        'POST body: `{"image": "<registry>/fixtures/alpine:3.17"}`. GET: the whole scan '
        "with its results document, without Accept-Encoding (as curl sends it).",
        "CPU ms per request: CPU time of each process during the runs over the requests "
        "served; for SecAPI's and the stored POST also the test bed's kube-apiserver, etcd "
        "and PostgreSQL "
        "(its postmaster only: backends are separate processes, not counted).",
    ]
    return PartResult(
        part="api", title=TITLE, method=method, figures=figures, rows=rows, targets=targets
    )
