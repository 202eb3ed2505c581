"""The scan queue: which Queued Scans get a Job next.

The queue is the set of Scans in phase Queued; there is no other store, so a
restarted operator rebuilds it from the cluster. Scans run by priority (the
owner's tier), then by the time they were queued, and never more than
`limit` Jobs exist at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class QueuedScan:
    """A Scan waiting in the queue, with what orders it."""

    namespace: str
    name: str
    priority: int
    queued_at: datetime

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def queue_order(scans: Iterable[QueuedScan]) -> list[QueuedScan]:
    """Return the Scans in the order they get Jobs: higher priority first, then older first."""
    return sorted(
        scans, key=lambda scan: (-scan.priority, scan.queued_at, scan.namespace, scan.name)
    )


def select_admissions(
    scans: Iterable[QueuedScan], *, existing_jobs: int, limit: int
) -> list[QueuedScan]:
    """Return the Scans that may get a Job now: the head of the queue, up to the free slots."""
    free = max(0, limit - existing_jobs)
    return queue_order(scans)[:free]
