"""Operator latency: Scan created to Job created, and Job finished to Scan Completed.

Scans are created one at a time with the Kubernetes API (as `kubectl apply`
would), for a small report (fixtures/alpine, 12 findings) and the large one
(fixtures/many-findings, 3,200 findings). Both latencies are measured on
receipt of watch events in this process, which watches Scans and Jobs of the
namespace over the same API server as the operator:

- created to Job: the Scan's ADDED event to the Job's ADDED event;
- finished to Completed: the first Job event with condition Complete=True to
  the Scan event with phase Completed (the operator stores the findings in
  PostgreSQL before it writes that phase; the benchmark checks the rows).

Kubernetes' own timestamps (creationTimestamp, completionTime) have a
resolution of one second; their differences are recorded as a cross-check.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bench import stats
from bench.cluster import Event
from bench.context import RunContext, say
from bench.operator_run import operator_session
from bench.results import PartResult, Target, seconds

TITLE = "Operator latency"
TARGET_TO_JOB = 0.2
TARGET_TO_COMPLETED = 0.5
IMAGES = (
    ("small", "fixtures/alpine:3.17", 12),
    ("large", "fixtures/many-findings:1.0", 3200),
)


def _timestamp(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _kube_seconds(later: str | None, earlier: str | None) -> float | None:
    end, start = _timestamp(later), _timestamp(earlier)
    if end is None or start is None:
        return None
    return (end - start).total_seconds()


def _max_seconds(samples: list[dict[str, Any]], key: str) -> str:
    values = [item[key] for item in samples if item[key] is not None]
    return f"{max(values):g} s" if values else "n/a"


def _latencies(events: dict[str, Event]) -> dict[str, Any]:
    scan = events["scan_completed"].obj
    job_added = events["job_added"].obj
    job_done = events["job_complete"].obj
    return {
        "to_job": events["job_added"].received_at - events["scan_added"].received_at,
        "to_completed": events["scan_completed"].received_at - events["job_complete"].received_at,
        "kube_to_job": _kube_seconds(
            job_added["metadata"]["creationTimestamp"], scan["metadata"]["creationTimestamp"]
        ),
        "kube_to_completed": _kube_seconds(
            scan.get("status", {}).get("completedAt"), job_done["status"].get("completionTime")
        ),
    }


def run(context: RunContext) -> PartResult:
    count = context.scale(10, 2)
    figures: dict[str, Any] = {"scans_per_report": count}
    targets = []
    rows: list[tuple[str, str]] = []

    with operator_session(context, label="latency", max_concurrent_scans=2) as session:
        # Warm-up: the first scan pays for the operator's first connections.
        session.run_scan("warmup", context.bed.image(IMAGES[0][1]))
        for label, image, findings in IMAGES:
            samples = []
            for index in range(count):
                events = session.run_scan(f"{label}-{index}", context.bed.image(image))
                samples.append(_latencies(events))
            to_job = [item["to_job"] for item in samples]
            to_completed = [item["to_completed"] for item in samples]
            say(
                f"operator: {label}: created to Job p50 {stats.median(to_job):.3f} s, "
                f"Job finished to Completed p50 {stats.median(to_completed):.3f} s"
            )
            figures[label] = {
                "image": image,
                "findings": findings,
                "created_to_job_seconds": stats.summarize(to_job),
                "job_finished_to_completed_seconds": stats.summarize(to_completed),
                "kubernetes_timestamps": {
                    "created_to_job_seconds": [item["kube_to_job"] for item in samples],
                    "job_finished_to_completed_seconds": [
                        item["kube_to_completed"] for item in samples
                    ],
                },
            }
            rows += [
                (
                    f"{label} ({findings} findings): Scan created to Job created, p50 / p90 / max",
                    " / ".join(
                        seconds(figures[label]["created_to_job_seconds"][key])
                        for key in ("p50", "p90", "max")
                    ),
                ),
                (
                    f"{label}: Job finished to Scan Completed, p50 / p90 / max",
                    " / ".join(
                        seconds(figures[label]["job_finished_to_completed_seconds"][key])
                        for key in ("p50", "p90", "max")
                    ),
                ),
                (
                    f"{label}: the same from Kubernetes timestamps (1 s resolution), max",
                    f"{_max_seconds(samples, 'kube_to_job')} / "
                    f"{_max_seconds(samples, 'kube_to_completed')}",
                ),
            ]
            targets += [
                Target(
                    f"{label}: created to Job p50", stats.median(to_job), "<", TARGET_TO_JOB, "s"
                ),
                Target(
                    f"{label}: Job finished to Completed p50",
                    stats.median(to_completed),
                    "<",
                    TARGET_TO_COMPLETED,
                    "s",
                ),
            ]

        stored = session.stored_scans()
    _check_stored(stored, count)
    figures["stored"] = {
        name: {"status": status, "findings": rows_}
        for name, (status, rows_) in sorted(stored.items())
    }

    method = [
        "A `secapi operator` subprocess (PostgreSQL of the test bed, a database of its own) "
        "watches one namespace; the fake kubelet runs each scan Job's Trivy against the fixture DB.",
        f"{count} Scans per report size, created one after the other with the Kubernetes API "
        "after one warm-up Scan; each waits for phase Completed before the next.",
        "Latencies are taken on receipt of watch events in the benchmark process: Scan ADDED "
        "to Job ADDED, and the first Job event with Complete=True to the Scan event with phase "
        "Completed. Kubernetes timestamps (one-second resolution) are kept in latest.json "
        "as a cross-check.",
    ]
    return PartResult(
        part="operator", title=TITLE, method=method, figures=figures, rows=rows, targets=targets
    )


def _check_stored(stored: dict[str, tuple[str, int]], count: int) -> None:
    """Fail unless every measured Scan's row is completed with all its findings."""
    for label, _, findings in IMAGES:
        for index in range(count):
            name = f"{label}-{index}"
            status, rows = stored.get(name, ("missing", 0))
            if status != "completed" or rows != findings:
                raise RuntimeError(
                    f"Scan {name} is {status} in the database with {rows} findings, "
                    f"expected completed with {findings}"
                )
