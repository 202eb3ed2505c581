"""Queue: a burst of Scans through the operator, against the same Jobs without it.

SecAPI side: 200 Scans of fixtures/alpine created at once in a namespace
watched by a `secapi operator` with maxConcurrentScans=10; the run ends when
the last one is Completed. Bare side: 200 Jobs with the pod template the
operator used, created by the benchmark itself so that at most 10 exist at
once. As soon as the watch reports a Job complete, the benchmark deletes it
and creates the next one, as the operator does once the result is stored.
Both run on the same fake kubelet, one after the other. The operator's
resident memory is sampled every 50 ms with psutil.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from bench.cluster import Cluster, Event, Watcher
from bench.context import RunContext, say
from bench.operator_run import job_complete, operator_session
from bench.results import PartResult, Target, seconds
from bench.servers import RssSampler

TITLE = "Queue throughput"
IMAGE = "fixtures/alpine:3.17"
MAX_CONCURRENT = 10
TARGET_MEMORY_MB = 200
# The operator is "not the bottleneck" when its throughput is within this
# fraction of the bare Jobs' throughput on the same kubelet.
TARGET_THROUGHPUT_RATIO = 0.9
CONTROLLER_LABELS = (
    "controller-uid",
    "job-name",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
)


def _max_concurrent(events: list[Event], *, start: str, end: Any) -> int:
    """Replay watch events: the most objects that had started and not yet ended at once."""
    active: set[str] = set()
    ended: set[str] = set()
    peak = 0
    for event in events:
        if event.name in ended:
            continue
        if event.type == "DELETED" or end(event.obj):
            active.discard(event.name)
            ended.add(event.name)
        elif start == "added" or _pod_running(event.obj):
            active.add(event.name)
        peak = max(peak, len(active))
    return peak


def _pod_running(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running"


def _pod_finished(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _never(obj: dict[str, Any]) -> bool:
    return False


def _job_finished(job: dict[str, Any]) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(
        item.get("type") in ("Complete", "Failed") and item.get("status") == "True"
        for item in conditions
    )


def _concurrency(jobs: list[Event], pods: list[Event]) -> dict[str, int]:
    return {
        "max_jobs_existing": _max_concurrent(jobs, start="added", end=_never),
        "max_jobs_unfinished": _max_concurrent(jobs, start="added", end=_job_finished),
        "max_pods_running": _max_concurrent(pods, start="running", end=_pod_finished),
    }


def _run_operator_side(context: RunContext, count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    image = context.bed.image(IMAGE)
    with operator_session(context, label="queue", max_concurrent_scans=MAX_CONCURRENT) as session:
        session.run_scan("warmup", image)
        sampler = RssSampler(session.operator.process.pid, interval=0.05).start()
        first_job = len(session.jobs.snapshot())
        first_pod = len(session.pods.snapshot())

        started = time.perf_counter()
        names = [f"queued-{index:03d}" for index in range(count)]
        for name in names:
            session.cluster.create_scan(session.namespace, name, image)
        created = time.perf_counter()
        say(f"queue: {count} Scans created in {created - started:.1f} s")

        finished: dict[str, float] = {}
        deadline = time.monotonic() + 900
        seen = 0
        while len(finished) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(finished)} of {count} Scans ended within 900 s")
            for event in session.scans.snapshot()[seen:]:
                seen += 1
                phase = (event.obj.get("status") or {}).get("phase")
                if (
                    event.name in names
                    and phase in ("Completed", "Failed")
                    and event.name not in finished
                ):
                    if phase == "Failed":
                        status = event.obj.get("status", {})
                        raise RuntimeError(
                            f"Scan {event.name} failed: {status.get('reason')}: {status.get('message')}"
                        )
                    finished[event.name] = event.received_at
            time.sleep(0.05)
        ended = max(finished.values())
        peak_rss = sampler.finish()
        idle_rss = RssSampler(session.operator.process.pid).start()
        time.sleep(0.2)
        idle = idle_rss.finish()

        jobs = session.jobs.snapshot()
        template = _pod_template(jobs[-1].obj)
        concurrency = _concurrency(jobs[first_job:], session.pods.snapshot()[first_pod:])
        stored = session.stored_scans()

    not_done = [name for name in names if stored.get(name, ("missing", 0))[0] != "completed"]
    if not_done:
        raise RuntimeError(
            f"{len(not_done)} Scans are not completed in the database, e.g. {not_done[0]}"
        )
    duration = ended - started
    completion_times = sorted(moment - started for moment in finished.values())
    figures = {
        "scans": count,
        "seconds": round(duration, 3),
        "completions_per_second": round(count / duration, 3),
        "first_completed_after_seconds": round(completion_times[0], 3),
        "operator_peak_rss_mb": round(peak_rss / 2**20, 1),
        "operator_rss_after_mb": round(idle / 2**20, 1),
        "rss_samples": sampler.samples,
        **concurrency,
    }
    return figures, template


def _pod_template(job: dict[str, Any]) -> dict[str, Any]:
    template = copy.deepcopy(job["spec"]["template"])
    labels = template.setdefault("metadata", {}).setdefault("labels", {})
    for key in CONTROLLER_LABELS:
        labels.pop(key, None)
    # The operator must not take the bare Jobs' pods for its own.
    labels.pop("app.kubernetes.io/managed-by", None)
    return template


def _bare_job(name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"secapi.io/bench": "bare"}},
        "spec": {"backoffLimit": 0, "template": copy.deepcopy(template)},
    }


def _run_bare_side(context: RunContext, count: int, template: dict[str, Any]) -> dict[str, Any]:
    cluster = Cluster(context.bed.kubeconfig)
    try:
        with cluster.namespace("secapi-bench-bare") as namespace:
            jobs = Watcher(cluster, namespace, "jobs").start()
            pods = Watcher(cluster, namespace, "pods").start()
            try:
                return _drive_bare_jobs(cluster, namespace, jobs, pods, count, template)
            finally:
                jobs.stop()
                pods.stop()
    finally:
        cluster.close()


def _drive_bare_jobs(
    cluster: Cluster,
    namespace: str,
    jobs: Watcher,
    pods: Watcher,
    count: int,
    template: dict[str, Any],
) -> dict[str, Any]:
    names = [f"bare-{index:03d}" for index in range(count)]
    started = time.perf_counter()
    created = 0
    for name in names[:MAX_CONCURRENT]:
        cluster.batch.create_namespaced_job(namespace, _bare_job(name, template))
        created += 1

    finished: dict[str, float] = {}
    seen = 0
    deadline = time.monotonic() + 900
    while len(finished) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(finished)} of {count} bare Jobs ended within 900 s")
        for event in jobs.wait_new(seen, timeout=1.0):
            seen += 1
            if event.name in finished or not _job_finished(event.obj):
                continue
            if not job_complete(event.obj):
                raise RuntimeError(f"bare Job {event.name} failed: {event.obj.get('status')}")
            finished[event.name] = event.received_at
            try:
                cluster.batch.delete_namespaced_job(
                    event.name, namespace, propagation_policy="Background"
                )
            except ApiException as error:
                if error.status != 404:
                    raise
            if created < count:
                cluster.batch.create_namespaced_job(namespace, _bare_job(names[created], template))
                created += 1
    ended = max(finished.values())
    duration = ended - started
    return {
        "jobs": count,
        "seconds": round(duration, 3),
        "completions_per_second": round(count / duration, 3),
        **_concurrency(jobs.snapshot(), pods.snapshot()),
    }


def run(context: RunContext) -> PartResult:
    count = context.scale(200, 20)
    operator_figures, template = _run_operator_side(context, count)
    say(f"queue: operator {operator_figures['completions_per_second']:.2f} scans/s")
    bare_figures = _run_bare_side(context, count, template)
    say(f"queue: bare Jobs {bare_figures['completions_per_second']:.2f} jobs/s")
    ratio = operator_figures["completions_per_second"] / bare_figures["completions_per_second"]
    figures = {
        "max_concurrent_scans": MAX_CONCURRENT,
        "image": IMAGE,
        "operator": operator_figures,
        "bare_jobs": bare_figures,
        "throughput_ratio": round(ratio, 3),
    }
    rows = [
        (
            f"operator: {count} Scans, first created to last Completed",
            seconds(operator_figures["seconds"]),
        ),
        ("operator: completions per second", f"{operator_figures['completions_per_second']:.2f}"),
        (f"bare: {count} Jobs, first created to last complete", seconds(bare_figures["seconds"])),
        ("bare: completions per second", f"{bare_figures['completions_per_second']:.2f}"),
        ("throughput ratio operator / bare", f"{ratio:.3f}"),
        (
            "operator: most scan Jobs unfinished at once (existing at once)",
            f"{operator_figures['max_jobs_unfinished']} ({operator_figures['max_jobs_existing']})",
        ),
        ("operator: most scan pods Running at once", str(operator_figures["max_pods_running"])),
        ("bare: most Jobs unfinished at once", str(bare_figures["max_jobs_unfinished"])),
        (
            "operator: peak RSS (after the burst)",
            f"{operator_figures['operator_peak_rss_mb']:.1f} MB ({operator_figures['operator_rss_after_mb']:.1f} MB)",
        ),
    ]
    targets = [
        Target(
            "most Jobs running at once",
            operator_figures["max_jobs_unfinished"],
            "<=",
            MAX_CONCURRENT,
        ),
        Target("throughput operator / bare Jobs", ratio, ">=", TARGET_THROUGHPUT_RATIO),
        Target(
            "operator peak RSS",
            operator_figures["operator_peak_rss_mb"],
            "<",
            TARGET_MEMORY_MB,
            "MB",
        ),
    ]
    method = [
        f"{count} Scans of `{IMAGE}` created back to back in one namespace; a `secapi operator` "
        f"subprocess with maxConcurrentScans={MAX_CONCURRENT} runs them on the fake kubelet "
        "after one warm-up Scan. Throughput: Scans over the time from the first create call to "
        "the receipt of the last phase Completed.",
        f"Bare baseline: {count} Jobs with the operator's pod template (taken from its last "
        f"Job), created by the benchmark so that at most {MAX_CONCURRENT} exist at once; each "
        "finished Job is deleted and the next one created on receipt of its Complete watch event.",
        "Concurrency: replayed from watch events; a Job counts from ADDED to its Complete or "
        "Failed condition, a pod while its phase is Running. Memory: psutil RSS of the operator "
        "process every 50 ms during the burst.",
    ]
    return PartResult(
        part="queue", title=TITLE, method=method, figures=figures, rows=rows, targets=targets
    )
