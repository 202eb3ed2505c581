"""The steps that move one Scan along: accept, start, finish, fail and tidy up.

Every step is safe to repeat: it first checks what the database, the Scan's
status and the Job already show, and does only what is missing. The
reconcile loop calls them; they raise Kubernetes and database errors, which
make the loop try again at its next pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError

from secapi.core.db.models import Scan, ScanStatus
from secapi.core.errors import InvalidInputError
from secapi.core.executors.kube_client import KubeApiError, KubeClient
from secapi.core.executors.scan_resource import (
    API_MANAGER,
    MANAGED_BY_LABEL,
    SCAN_ID_LABEL,
    Phase,
    status_of,
)
from secapi.core.executors.scan_spec import options_from_spec
from secapi.core.scans.failures import classify_trivy_failure
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.reasons import FailureReason
from secapi.core.scans.report import ReportError
from secapi.core.settings import Settings
from secapi.operator import events, status
from secapi.operator.cluster import Snapshot, job_finished, job_generation, job_scan_uid
from secapi.operator.diagnosis import (
    Failure,
    diagnose_failed_job,
    diagnose_stuck_job,
    job_failed,
    job_succeeded,
)
from secapi.operator.jobs import (
    CONTAINER_NAME,
    SCRIPT_NAME,
    ScanJobSource,
    build_job,
    job_go_environment,
    job_name,
    job_trivy_flags,
)
from secapi.operator.queue import QueuedScan
from secapi.operator.records import ResourceRef, ScanRecords, resource_ref
from secapi.operator.report_log import ReportLogError, decode_report_log

log = structlog.get_logger(__name__)

# Bytes of the end of a failed pod's log read to find Trivy's error message.
FAILURE_LOG_TAIL_BYTES = 16 * 1024


def _summary_of(scan: Scan) -> status.Summary:
    return status.Summary(
        critical=scan.critical,
        high=scan.high,
        medium=scan.medium,
        low=scan.low,
        unknown=scan.unknown,
        secrets=scan.secrets,
        misconfigurations=scan.misconfigurations,
    )


class ScanSteps:
    """The steps of all Scans; the only per-Scan state is the cache of checked final rows."""

    def __init__(
        self,
        *,
        kube: KubeClient,
        records: ScanRecords,
        settings: Settings,
        clock: Callable[[], datetime],
    ) -> None:
        self._kube = kube
        self._records = records
        self._settings = settings
        self._clock = clock
        # Final Scans whose database row was checked once by this process.
        self._checked_final: set[tuple[str, int]] = set()

    # Writes to the cluster

    async def _patch(self, body: dict[str, Any], new_status: dict[str, Any]) -> None:
        metadata = body["metadata"]
        await self._kube.patch_scan_status(metadata["namespace"], metadata["name"], new_status)

    async def _event(self, body: dict[str, Any], *, kind: str, reason: str, message: str) -> None:
        """Post an Event; a failure to post is logged and does not stop the step."""
        event = events.build_event(
            body, kind=kind, reason=reason, message=message, now=self._clock()
        )
        try:
            await self._kube.create_event(body["metadata"]["namespace"], event)
        except Exception as error:
            log.warning(
                "posting an event failed",
                namespace=body["metadata"]["namespace"],
                scan=body["metadata"]["name"],
                reason=reason,
                error=str(error),
            )

    async def _delete_job(self, job: dict[str, Any]) -> None:
        metadata = job["metadata"]
        deleted = await self._kube.delete_job(
            metadata["namespace"], metadata["name"], uid=metadata.get("uid")
        )
        if deleted:
            log.info("scan job deleted", namespace=metadata["namespace"], job=metadata["name"])

    # Accepting a new generation

    async def accept(self, body: dict[str, Any], snapshot: Snapshot) -> QueuedScan | None:
        """Give a new or changed Scan its database row and put it in the queue.

        Returns the Scan's place in the queue, so the same pass can start its Job,
        or None when the Scan did not get into the queue.
        """
        ref = resource_ref(body, scan_id_label=SCAN_ID_LABEL)
        spec = body.get("spec") or {}
        current = status_of(body)
        invalid: InvalidInputError | None = None
        try:
            image, options = options_from_spec(spec, self._settings)
        except InvalidInputError as error:
            invalid = error
            # The row still records the scan, so the API and the status show the failure.
            image, options = str(spec.get("image", ""))[:512], ScanOptions()

        try:
            row = await self._records.claim(ref, image=image, options=options)
        except (SQLAlchemyError, OSError) as error:
            await self._wait_for_database(body, ref, current, error)
            return None

        # A Job of an earlier generation scans the old spec: stop it.
        for job in snapshot.jobs_of_scan(ref.uid):
            if job_generation(job) != ref.generation:
                await self._delete_job(job)

        if ScanStatus(row.status).is_final:
            await self._copy_final_row(body, row, job=None)
            return None
        if invalid is not None:
            await self.fail(
                body,
                Failure(FailureReason.INVALID_INPUT, invalid.message),
                scan_id=row.id,
                generation=ref.generation,
            )
            return None

        now = self._clock()
        await self._patch(
            body,
            status.queued_status(
                generation=ref.generation, scan_id=row.id, priority=row.priority, now=now
            ),
        )
        log.info(
            "scan queued",
            scan_id=row.id,
            namespace=ref.namespace,
            scan=ref.name,
            generation=ref.generation,
            priority=row.priority,
        )
        await self._event(
            body,
            kind=events.NORMAL,
            reason="Queued",
            message=f"Scan of {image} queued as scan {row.id} (generation {ref.generation}, "
            f"priority {row.priority})",
        )
        return QueuedScan(
            namespace=ref.namespace, name=ref.name, priority=row.priority, queued_at=now
        )

    async def _wait_for_database(
        self, body: dict[str, Any], ref: ResourceRef, current: dict[str, Any], error: Exception
    ) -> None:
        """Mark the Scan Pending while the database is down, and fail it past the queue timeout."""
        reason = FailureReason.DATABASE_UNAVAILABLE.value
        log.warning(
            "database unavailable; the scan waits",
            namespace=ref.namespace,
            scan=ref.name,
            error=repr(error),
        )
        now = self._clock()
        since = None
        for condition in current.get("conditions") or []:
            if current.get("phase") == Phase.PENDING and condition.get("reason") == reason:
                since = status.parse_timestamp(condition.get("lastTransitionTime"))
        if since is None:
            await self._patch(
                body,
                status.pending_status(
                    generation=ref.generation,
                    reason=reason,
                    message="waiting for the database to record the scan",
                    now=now,
                ),
            )
            return
        limit = timedelta(seconds=self._settings.scanner.queue_timeout_seconds)
        if now - since > limit:
            failed = status.failed_status(
                generation=ref.generation,
                reason=reason,
                message=f"the database could not be reached for {int(limit.total_seconds())} "
                "seconds, so the scan was never recorded; apply the Scan again once it is back",
                job_name=None,
                started_at=None,
                completed_at=now,
                now=now,
            )
            await self._patch(body, failed)
            await self._event(body, kind=events.WARNING, reason=reason, message=failed["message"])

    # The queue

    async def check_queued(self, body: dict[str, Any], snapshot: Snapshot) -> QueuedScan | None:
        """Adopt a Job that exists already, fail a Scan queued too long, else return its place."""
        metadata = body["metadata"]
        current = status_of(body)
        generation = int(metadata.get("generation") or 1)
        name = job_name(scan_name=metadata["name"], scan_uid=metadata["uid"], generation=generation)

        job = snapshot.job_named(metadata["namespace"], name)
        if job is not None and job_scan_uid(job) == metadata["uid"]:
            # The operator stopped after creating this Job and before recording it.
            log.info("existing scan job adopted", namespace=metadata["namespace"], job=name)
            await self._record_started(body, scan_id=current.get("scanId"), job=job)
            return None

        now = self._clock()
        queued_at = (
            status.parse_timestamp(current.get("queuedAt"))
            or status.parse_timestamp(metadata.get("creationTimestamp"))
            or now
        )
        limit = timedelta(seconds=self._settings.scanner.queue_timeout_seconds)
        if now - queued_at > limit:
            await self.fail(
                body,
                Failure(
                    FailureReason.QUEUE_TIMEOUT,
                    f"the scan waited in the queue for more than {int(limit.total_seconds())} "
                    "seconds without a free scan slot; raise maxConcurrentScans or the queue timeout",
                ),
                scan_id=current.get("scanId"),
                generation=generation,
            )
            return None
        return QueuedScan(
            namespace=metadata["namespace"],
            name=metadata["name"],
            priority=int(current.get("priority") or 0),
            queued_at=queued_at,
        )

    async def start(self, entry: QueuedScan) -> None:
        """Create the Job of a Queued Scan, or adopt the one that exists, and mark it Running."""
        body = await self._kube.get_scan(entry.namespace, entry.name)
        if body is None:
            return
        metadata = body["metadata"]
        current = status_of(body)
        generation = int(metadata.get("generation") or 1)
        if current.get("phase") != Phase.QUEUED or current.get("observedGeneration") != generation:
            return

        scan_id = current.get("scanId")
        row = await self._records.get(scan_id) if scan_id else None
        if row is None:
            await self._row_missing(body, job=None)
            return
        if ScanStatus(row.status).is_final:
            await self._copy_final_row(body, row, job=None)
            return

        spec = body.get("spec") or {}
        try:
            image, options = options_from_spec(spec, self._settings)
        except InvalidInputError as error:
            await self.fail(
                body,
                Failure(FailureReason.INVALID_INPUT, error.message),
                scan_id=row.id,
                generation=generation,
            )
            return
        secret = (spec.get("registrySecretRef") or {}).get("name")
        timeout = options.timeout_seconds or self._settings.scanner.timeout_seconds
        source = ScanJobSource(
            name=metadata["name"],
            namespace=metadata["namespace"],
            uid=metadata["uid"],
            generation=generation,
            scan_id=row.id,
            image=image,
            timeout_seconds=timeout,
            trivy_flags=tuple(
                job_trivy_flags(options, self._settings.scanner, timeout_seconds=timeout)
            ),
            registry_secret=secret,
            go_environment=job_go_environment(self._settings.scanner, self._settings.kubernetes),
        )
        manifest = build_job(source, self._settings.kubernetes)
        try:
            job = await self._kube.create_job(metadata["namespace"], manifest)
            log.info(
                "scan job created",
                scan_id=row.id,
                namespace=metadata["namespace"],
                job=manifest["metadata"]["name"],
            )
        except KubeApiError as error:
            if error.status != 409:
                raise
            existing = await self._kube.get_job(metadata["namespace"], manifest["metadata"]["name"])
            if existing is None or job_scan_uid(existing) != metadata["uid"]:
                raise
            log.info(
                "existing scan job adopted",
                namespace=metadata["namespace"],
                job=manifest["metadata"]["name"],
            )
            job = existing
        await self._record_started(body, scan_id=row.id, job=job)

    async def _record_started(
        self, body: dict[str, Any], *, scan_id: str | None, job: dict[str, Any]
    ) -> None:
        metadata = body["metadata"]
        generation = int(metadata.get("generation") or 1)
        started_at = (
            status.parse_timestamp(job["metadata"].get("creationTimestamp")) or self._clock()
        )
        if scan_id:
            await self._records.mark_running(scan_id, started_at=started_at)
        await self._patch(
            body,
            status.running_status(
                generation=generation,
                job_name=job["metadata"]["name"],
                started_at=started_at,
                now=self._clock(),
            ),
        )
        await self._event(
            body,
            kind=events.NORMAL,
            reason="Started",
            message=f"Created Job {job['metadata']['name']} to scan {body.get('spec', {}).get('image', '')}",
        )

    # Running scans

    def _job_of_running(
        self, body: dict[str, Any], snapshot: Snapshot
    ) -> tuple[str, dict[str, Any] | None]:
        """Return the name of a Running Scan's Job and the Job, None when it does not exist."""
        metadata = body["metadata"]
        generation = int(metadata.get("generation") or 1)
        name = status_of(body).get("jobName") or job_name(
            scan_name=metadata["name"], scan_uid=metadata["uid"], generation=generation
        )
        job = snapshot.job_named(metadata["namespace"], name)
        if job is not None and job_scan_uid(job) != metadata["uid"]:
            job = None
        return name, job

    def has_finished_job(self, body: dict[str, Any], snapshot: Snapshot) -> bool:
        """Return whether a Running Scan's Job has ended, so its result is ready to store."""
        _, job = self._job_of_running(body, snapshot)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return False
        return job_finished(job)

    async def check_running(self, body: dict[str, Any], snapshot: Snapshot) -> None:
        """Finish, fail or keep waiting for the Job of a Running Scan."""
        metadata = body["metadata"]
        current = status_of(body)
        generation = int(metadata.get("generation") or 1)
        name, job = self._job_of_running(body, snapshot)

        if job is None or job["metadata"].get("deletionTimestamp"):
            await self._job_gone(body, name)
            return

        pod = snapshot.pod_of_job(job)
        if job_succeeded(job):
            await self._complete(body, job, pod)
        elif job_failed(job):
            await self._fail_job(body, job, pod)
        else:
            settings = self._settings.kubernetes
            failure = diagnose_stuck_job(
                job,
                pod,
                container=CONTAINER_NAME,
                now=self._clock(),
                pending_timeout=timedelta(seconds=settings.pending_timeout_seconds),
                image_pull_grace=timedelta(seconds=settings.image_pull_grace_seconds),
            )
            if failure is not None:
                await self.fail(
                    body, failure, scan_id=current.get("scanId"), generation=generation, job=job
                )

    async def _job_gone(self, body: dict[str, Any], name: str) -> None:
        current = status_of(body)
        scan_id = current.get("scanId")
        row = await self._records.get(scan_id) if scan_id else None
        if row is None:
            await self._row_missing(body, job=None)
        elif ScanStatus(row.status).is_final:
            # The result was stored and the status write did not happen.
            await self._copy_final_row(body, row, job=None)
        else:
            await self.fail(
                body,
                Failure(
                    FailureReason.JOB_DELETED,
                    f"Job {name} was deleted before the scan finished, by someone other than "
                    "the operator; apply the Scan with a changed spec or submit it again to rerun it",
                ),
                scan_id=scan_id,
                generation=int(body["metadata"].get("generation") or 1),
            )

    async def _complete(
        self, body: dict[str, Any], job: dict[str, Any], pod: dict[str, Any] | None
    ) -> None:
        """Read, verify and store the report of a Job that succeeded."""
        metadata = body["metadata"]
        current = status_of(body)
        generation = int(metadata.get("generation") or 1)
        scan_id = current.get("scanId")
        row = await self._records.get(scan_id) if scan_id else None
        if row is None:
            await self._row_missing(body, job=job)
            return
        if ScanStatus(row.status).is_final:
            await self._copy_final_row(body, row, job=job)
            return

        failure, report = await self._read_report(job, pod)
        if failure is not None:
            await self.fail(body, failure, scan_id=row.id, generation=generation, job=job)
            return
        assert report is not None

        try:
            stored = await self._records.store_report(row.id, report)
        except ReportError as error:
            await self.fail(
                body,
                Failure(FailureReason.REPORT_INVALID, f"Trivy's report could not be read: {error}"),
                scan_id=row.id,
                generation=generation,
                job=job,
            )
            return
        if stored is None:
            await self._row_missing(body, job=job)
            return
        log.info(
            "scan completed",
            scan_id=stored.id,
            namespace=metadata["namespace"],
            job=job["metadata"]["name"],
            critical=stored.critical,
            high=stored.high,
        )
        await self._copy_final_row(body, stored, job=job)

    async def _read_report(
        self, job: dict[str, Any], pod: dict[str, Any] | None
    ) -> tuple[Failure | None, bytes | None]:
        """Return the verified report bytes of a finished Job's pod, or why there are none."""
        job_name_ = job["metadata"]["name"]
        max_log = self._settings.kubernetes.max_log_bytes
        data = None
        if pod is not None:
            data = await self._kube.read_pod_log(
                pod["metadata"]["namespace"],
                pod["metadata"]["name"],
                container=CONTAINER_NAME,
                limit_bytes=max_log + 1,
            )
        if data is None:
            return Failure(
                FailureReason.REPORT_TRUNCATED,
                f"the pod of Job {job_name_} is gone, so its log and the report in it cannot be read",
            ), None
        if len(data) > max_log:
            return Failure(
                FailureReason.REPORT_TOO_LARGE,
                f"the log of Job {job_name_} is larger than the maximum of {max_log} bytes; "
                "raise the operator's maximum log size",
            ), None
        try:
            decoded = await asyncio.to_thread(
                decode_report_log, data, max_report_bytes=self._settings.scanner.max_report_bytes
            )
        except ReportLogError as error:
            reason = (
                FailureReason.REPORT_TOO_LARGE
                if error.too_large
                else FailureReason.REPORT_TRUNCATED
            )
            return Failure(
                reason, f"the report of Job {job_name_} was rejected: {error.message}"
            ), None
        return None, decoded.data

    async def _fail_job(
        self, body: dict[str, Any], job: dict[str, Any], pod: dict[str, Any] | None
    ) -> None:
        tail = ""
        if pod is not None:
            data = await self._kube.read_pod_log(
                pod["metadata"]["namespace"],
                pod["metadata"]["name"],
                container=CONTAINER_NAME,
                tail_lines=200,
            )
            text = (data or b"")[-FAILURE_LOG_TAIL_BYTES:].decode("utf-8", "replace")
            # The scan script's own closing line would end up in Trivy's error message.
            tail = "\n".join(
                line for line in text.splitlines() if not line.startswith(SCRIPT_NAME + ":")
            )
        failure = diagnose_failed_job(
            job,
            pod,
            container=CONTAINER_NAME,
            log_tail=tail,
            classify_scanner_error=classify_trivy_failure,
        )
        await self.fail(
            body,
            failure,
            scan_id=status_of(body).get("scanId"),
            generation=int(body["metadata"].get("generation") or 1),
            job=job,
        )

    # Endings

    async def fail(
        self,
        body: dict[str, Any],
        failure: Failure,
        *,
        scan_id: str | None,
        generation: int,
        job: dict[str, Any] | None = None,
    ) -> None:
        """End a scan as Failed: database row, then status and event, then the Job."""
        reason, message = failure.reason.value, failure.message
        row = (
            await self._records.mark_failed(scan_id, reason=reason, message=message)
            if scan_id
            else None
        )
        if row is not None and row.status == ScanStatus.COMPLETED.value:
            await self._copy_final_row(body, row, job=job)
            return
        if row is not None and row.reason:
            # A repeated step reports the failure that was stored first.
            reason, message = row.reason, row.message or message

        now = self._clock()
        current = status_of(body)
        failed = status.failed_status(
            generation=generation,
            reason=reason,
            message=message,
            job_name=job["metadata"]["name"] if job else current.get("jobName"),
            started_at=status.parse_timestamp(current.get("startedAt")),
            completed_at=row.completed_at if row is not None and row.completed_at else now,
            now=now,
        )
        if scan_id:
            # A scan failed while it was accepted has no scanId in its status yet.
            failed["scanId"] = scan_id
        await self._patch(body, failed)
        log.info(
            "scan failed",
            scan_id=scan_id,
            namespace=body["metadata"]["namespace"],
            scan=body["metadata"]["name"],
            reason=reason,
            message=message,
        )
        await self._event(body, kind=events.WARNING, reason=reason, message=message)
        if job is not None:
            await self._delete_job(job)

    async def _copy_final_row(
        self, body: dict[str, Any], row: Scan, *, job: dict[str, Any] | None
    ) -> None:
        """Write a completed or failed row's outcome to the status, then delete the Job."""
        generation = int(body["metadata"].get("generation") or 1)
        now = self._clock()
        current = status_of(body)
        job_name_ = job["metadata"]["name"] if job else current.get("jobName")
        new_status: dict[str, Any]
        if row.status == ScanStatus.COMPLETED.value:
            new_status = status.completed_status(
                generation=generation,
                job_name=job_name_,
                summary=_summary_of(row),
                image_digest=row.image_digest,
                trivy_version=row.trivy_version,
                started_at=row.started_at,
                completed_at=row.completed_at or now,
                now=now,
            )
            new_status["scanId"] = row.id
            await self._patch(body, new_status)
            await self._event(
                body, kind=events.NORMAL, reason="Completed", message=new_status["message"]
            )
        else:
            new_status = status.failed_status(
                generation=generation,
                reason=row.reason or FailureReason.SCANNER_ERROR.value,
                message=row.message or "the scan failed",
                job_name=job_name_,
                started_at=row.started_at,
                completed_at=row.completed_at or now,
                now=now,
            )
            new_status["scanId"] = row.id
            await self._patch(body, new_status)
            await self._event(
                body,
                kind=events.WARNING,
                reason=new_status["reason"],
                message=new_status["message"],
            )
        if job is not None:
            await self._delete_job(job)

    async def _row_missing(self, body: dict[str, Any], *, job: dict[str, Any] | None) -> None:
        """Handle a Scan whose database row was deleted: the API deleted the scan, or an admin did."""
        metadata = body["metadata"]
        if job is not None:
            await self._delete_job(job)
        if (metadata.get("labels") or {}).get(MANAGED_BY_LABEL) == API_MANAGER:
            # The API deletes the row and the Scan together; finish the second half.
            log.info(
                "scan resource deleted because its database record is gone",
                namespace=metadata["namespace"],
                scan=metadata["name"],
            )
            await self._kube.delete_scan(metadata["namespace"], metadata["name"])
            return
        now = self._clock()
        current = status_of(body)
        await self._patch(
            body,
            status.failed_status(
                generation=int(metadata.get("generation") or 1),
                reason=FailureReason.INTERRUPTED.value,
                message="the scan's database record was deleted while the scan was not finished; "
                "apply the Scan with a changed spec to scan again",
                job_name=current.get("jobName"),
                started_at=status.parse_timestamp(current.get("startedAt")),
                completed_at=now,
                now=now,
            ),
        )

    async def tidy_final(self, body: dict[str, Any], snapshot: Snapshot) -> None:
        """Delete Jobs left behind by a finished Scan and make sure its row ended too."""
        metadata = body["metadata"]
        for job in snapshot.jobs_of_scan(metadata["uid"]):
            log.warning(
                "leftover scan job of a finished scan deleted",
                namespace=metadata["namespace"],
                job=job["metadata"]["name"],
            )
            await self._delete_job(job)

        generation = int(metadata.get("generation") or 1)
        key = (metadata["uid"], generation)
        if key in self._checked_final:
            return
        current = status_of(body)
        scan_id = current.get("scanId")
        if scan_id and current.get("phase") == Phase.FAILED:
            # The status may have been written while the database was down.
            await self._records.mark_failed(
                scan_id,
                reason=current.get("reason") or FailureReason.SCANNER_ERROR.value,
                message=current.get("message") or "the scan failed",
            )
        self._checked_final.add(key)

    async def forget(self, body: dict[str, Any]) -> None:
        """Fail the row of a Scan resource deleted before its scan ended."""
        current = status_of(body)
        scan_id = current.get("scanId")
        if not scan_id or current.get("phase") in (Phase.COMPLETED, Phase.FAILED):
            return
        row = await self._records.mark_failed(
            scan_id,
            reason=FailureReason.INTERRUPTED.value,
            message="the Scan resource was deleted before the scan finished",
        )
        if row is not None:
            log.info(
                "scan of a deleted scan resource ended",
                scan_id=scan_id,
                namespace=body["metadata"]["namespace"],
                scan=body["metadata"]["name"],
            )
