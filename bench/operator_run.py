"""One operator on the test bed, for the latency and queue parts.

Each session gets its own namespace, its own PostgreSQL database (migrated
with `secapi migrate`) and a `secapi operator` subprocess that watches only
that namespace. Watches of Scans, Jobs and pods start before the operator, so
no event is missed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from bench.bed import scratch_database
from bench.cluster import Cluster, Event, Watcher
from bench.context import RunContext, say
from bench.servers import Service, migrate, secapi_env, start_operator
from bench.trivy import scanner_env


@dataclass
class OperatorSession:
    cluster: Cluster
    namespace: str
    database_url: str
    operator: Service
    scans: Watcher
    jobs: Watcher
    pods: Watcher

    def run_scan(self, name: str, image: str, *, timeout: float = 300.0) -> dict[str, Event]:
        """Create a Scan and wait until it is Completed; return the events that mark its steps."""
        self.cluster.create_scan(self.namespace, name, image)
        return self.wait_for_scan(name, timeout=timeout)

    def wait_for_scan(self, name: str, *, timeout: float) -> dict[str, Event]:
        scan_added = self.scans.wait_for(
            lambda event: event.name == name and event.type == "ADDED", timeout=timeout
        )
        final = self.scans.wait_for(
            lambda event: event.name == name and _phase(event.obj) in ("Completed", "Failed"),
            timeout=timeout,
        )
        if _phase(final.obj) != "Completed":
            status = final.obj.get("status", {})
            raise RuntimeError(
                f"Scan {name} failed: {status.get('reason')}: {status.get('message')}"
            )
        job_added = self.jobs.wait_for(
            lambda event: event.type == "ADDED" and job_scan(event.obj) == name, timeout=5
        )
        job_done = self.jobs.wait_for(
            lambda event: job_scan(event.obj) == name and job_complete(event.obj), timeout=5
        )
        return {
            "scan_added": scan_added,
            "job_added": job_added,
            "job_complete": job_done,
            "scan_completed": final,
        }

    def stored_scans(self) -> dict[str, tuple[str, int]]:
        """Return {Scan name: (database status, findings rows)} of this session's scans."""
        query = (
            "SELECT s.k8s_name, s.status, "
            "(SELECT count(*) FROM findings f WHERE f.scan_id = s.id) "
            "FROM scans s WHERE s.k8s_namespace = %s"
        )
        with psycopg.connect(self.database_url) as connection:
            rows = connection.execute(query, (self.namespace,)).fetchall()
        return {str(name): (str(status), int(count)) for name, status, count in rows}


def _phase(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("phase")


def job_scan(job: dict[str, Any]) -> str | None:
    labels = job.get("metadata", {}).get("labels") or {}
    return labels.get("secapi.io/scan")


def job_complete(job: dict[str, Any]) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(
        item.get("type") == "Complete" and item.get("status") == "True" for item in conditions
    )


@contextmanager
def operator_session(
    context: RunContext, *, label: str, max_concurrent_scans: int
) -> Iterator[OperatorSession]:
    bed = context.bed
    cluster = Cluster(bed.kubeconfig)
    with ExitStack() as stack:
        stack.callback(cluster.close)
        cluster.ensure_crd()
        database_url = stack.enter_context(scratch_database(bed, f"secapi_bench_{label}"))
        namespace = stack.enter_context(cluster.namespace(f"secapi-bench-{label}"))
        env = secapi_env(
            {
                "DATABASE_URL": database_url,
                "KUBECONFIG": str(bed.kubeconfig),
                "SECAPI_NAMESPACE": namespace,
                **scanner_env(bed, max_concurrent_scans=max_concurrent_scans),
            }
        )
        migrate(env)

        watchers = {}
        for kind in ("scans", "jobs", "pods"):
            watcher = Watcher(cluster, namespace, kind).start()
            stack.callback(watcher.stop)
            watchers[kind] = watcher
        operator = start_operator(
            f"operator-{label}", namespace=namespace, env=env, work_dir=context.work_dir
        )
        stack.callback(operator.stop)
        say(f"{label}: operator watches namespace {namespace}")
        yield OperatorSession(
            cluster=cluster,
            namespace=namespace,
            database_url=database_url,
            operator=operator,
            scans=watchers["scans"],
            jobs=watchers["jobs"],
            pods=watchers["pods"],
        )
