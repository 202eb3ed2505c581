"""The reconcile loop: moves every Scan through Queued, Running and a final phase.

One task runs passes over all Scans, Jobs and pods of the watched
namespaces; watch events (from the Kopf handlers) start a pass at once, and a
pass also runs every `resync_seconds`, so deadlines hold without events. A
pass only reads the cluster and the database and repeats nothing that was
done, so a pass after a restart continues where the operator stopped:

- a Scan whose metadata.generation differs from status.observedGeneration
  gets a database row (a GitOps Scan gets one owned by a cluster principal)
  and is Queued, and can get its Job in the same pass;
- Queued Scans get Jobs in queue order while fewer than maxConcurrentScans
  unfinished Jobs exist; a Job that already exists for the Scan is adopted;
- a finished Job's report is read from the pod log, verified, parsed and
  stored, then the status is written and the Job deleted. This runs after
  the pass starts new Jobs, for up to RESULT_CONCURRENCY Jobs at a time;
- every way of failing ends in phase Failed with a stable reason.

Order of writes for each change: database first, then the Scan's status,
then the Job. A crash between two writes leaves a state the next pass
recognises and completes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import structlog

from secapi.core.db.models import utcnow
from secapi.core.executors.kube_client import KubeApiError, KubeClient, KubeUnreachableError
from secapi.core.executors.scan_resource import (
    Phase,
    status_of,
)
from secapi.core.settings import Settings
from secapi.operator import cluster
from secapi.operator.queue import QueuedScan, select_admissions
from secapi.operator.records import ScanRecords
from secapi.operator.scan_steps import ScanSteps

log = structlog.get_logger(__name__)

# Seconds a pass waits after a wake-up. It is on the path from every event to its
# handling, and events that arrive during a pass start one more pass anyway, so a
# long wait only adds latency.
SETTLE_SECONDS = 0.02
# Finished Jobs whose results are read and stored at once. Each one keeps a report
# in memory and uses a database connection while it is stored.
RESULT_CONCURRENCY = 4


class Reconciler:
    """The loop of reconcile passes; `wake()` requests a pass soon."""

    def __init__(
        self,
        *,
        kube: KubeClient,
        records: ScanRecords,
        settings: Settings,
        namespaces: Iterable[str] = (),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._kube = kube
        self._records = records
        self._settings = settings
        self._clock = clock
        # Fixed namespaces from the command line; more are learned from watch events.
        self._namespaces: set[str] = set(namespaces)
        self._wakeup = asyncio.Event()
        self._steps = ScanSteps(kube=kube, records=records, settings=settings, clock=clock)
        self.passes = 0

    def watch_namespace(self, namespace: str) -> None:
        if namespace not in self._namespaces:
            self._namespaces.add(namespace)
            log.info("namespace added to the reconcile passes", namespace=namespace)

    def wake(self) -> None:
        self._wakeup.set()

    async def forget(self, body: dict[str, Any]) -> None:
        """End the database row of a Scan resource that was deleted; errors are logged only."""
        try:
            await self._steps.forget(body)
        except Exception as error:
            log.warning(
                "ending the scan of a deleted Scan resource failed",
                namespace=body["metadata"]["namespace"],
                scan=body["metadata"]["name"],
                error=repr(error),
            )

    async def run(self) -> None:
        """Run passes until cancelled; an error fails one pass, never the loop."""
        interval = self._settings.kubernetes.resync_seconds
        log.info(
            "reconcile loop started", namespaces=sorted(self._namespaces), resync_seconds=interval
        )
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=interval)
            # Let the events of one change (a Scan, its Job and pod) settle into one pass.
            await asyncio.sleep(SETTLE_SECONDS)
            self._wakeup.clear()
            try:
                await self.run_pass()
            except (KubeApiError, KubeUnreachableError) as error:
                log.warning("reconcile pass failed; retrying at the next pass", error=str(error))
            except Exception:
                log.exception(
                    "reconcile pass failed with an unexpected error; retrying at the next pass"
                )

    async def run_pass(self) -> None:
        """Reconcile every Scan once, then start Jobs for the head of the queue."""
        if not self._namespaces:
            return
        snapshot = await cluster.take_snapshot(self._kube, self._namespaces)
        queued: list[QueuedScan] = []
        finished: list[dict[str, Any]] = []

        for body in snapshot.scans:
            if self._has_finished_job(body, snapshot):
                finished.append(body)
                continue
            entry = await self._reconcile_logged(body, snapshot)
            if entry is not None:
                queued.append(entry)

        # Finished Jobs hold no slot, so new Jobs need not wait for their results.
        await self._admit(queued)

        slots = asyncio.Semaphore(RESULT_CONCURRENCY)

        async def finish(body: dict[str, Any]) -> None:
            async with slots:
                await self._reconcile_logged(body, snapshot)

        await asyncio.gather(*(finish(body) for body in finished))
        self.passes += 1

    def _has_finished_job(self, body: dict[str, Any], snapshot: cluster.Snapshot) -> bool:
        """Return whether a Scan is Running, current, and its Job has ended."""
        metadata = body["metadata"]
        current = status_of(body)
        if metadata.get("deletionTimestamp") or current.get("phase") != Phase.RUNNING:
            return False
        if current.get("observedGeneration") != int(metadata.get("generation") or 1):
            return False
        return self._steps.has_finished_job(body, snapshot)

    async def _reconcile_logged(
        self, body: dict[str, Any], snapshot: cluster.Snapshot
    ) -> QueuedScan | None:
        """Reconcile one Scan; an error is logged and leaves the Scan to the next pass."""
        try:
            return await self._reconcile(body, snapshot)
        except (KubeApiError, KubeUnreachableError) as error:
            log.warning(
                "reconciling a Scan failed; retrying at the next pass",
                namespace=body["metadata"]["namespace"],
                scan=body["metadata"]["name"],
                error=str(error),
            )
        except Exception as error:
            # A database outage lands here too: the Scan waits for the next pass.
            log.warning(
                "reconciling a Scan failed; retrying at the next pass",
                namespace=body["metadata"]["namespace"],
                scan=body["metadata"]["name"],
                error=repr(error),
            )
        return None

    async def _reconcile(
        self, body: dict[str, Any], snapshot: cluster.Snapshot
    ) -> QueuedScan | None:
        """Take one Scan one step further; return it when it waits in the queue."""
        metadata = body["metadata"]
        if metadata.get("deletionTimestamp"):
            return None
        generation = int(metadata.get("generation") or 1)
        current = status_of(body)
        steps = self._steps

        if current.get("observedGeneration") != generation:
            return await steps.accept(body, snapshot)

        phase = current.get("phase")
        if phase == Phase.QUEUED:
            return await steps.check_queued(body, snapshot)
        if phase == Phase.RUNNING:
            await steps.check_running(body, snapshot)
            return None
        if phase in (Phase.COMPLETED, Phase.FAILED):
            await steps.tidy_final(body, snapshot)
        return None

    async def _admit(self, queued: list[QueuedScan]) -> None:
        """Start Jobs for the head of the queue while fewer than the maximum are unfinished."""
        if not queued:
            return
        limit = self._settings.scanner.max_concurrent_scans
        # A fresh list, not the snapshot: it counts every Job started since the snapshot.
        unfinished = await cluster.count_unfinished_jobs(self._kube, self._namespaces)
        for entry in select_admissions(queued, existing_jobs=unfinished, limit=limit):
            try:
                await self._steps.start(entry)
            except (KubeApiError, KubeUnreachableError) as error:
                log.warning(
                    "starting a scan Job failed; retrying at the next pass",
                    namespace=entry.namespace,
                    scan=entry.name,
                    error=str(error),
                )
                # A Job may exist even though the call failed, so count it as started.
            except Exception as error:
                log.warning(
                    "starting a scan Job failed; retrying at the next pass",
                    namespace=entry.namespace,
                    scan=entry.name,
                    error=repr(error),
                )
