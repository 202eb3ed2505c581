"""The operator's database work: one short transaction per state change of a scan.

Each method owns its unit of work and commits. The reconcile loop calls them
before it changes anything in the cluster, so after a crash the database is
not behind the Scan's status. A restarted operator finds every row it needs
and repeats only steps that are safe to repeat. The one exception is a Scan
failed while the database was down: its row is ended at a later pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from secapi.core.db import scan_resources
from secapi.core.db.models import Scan, ScanStatus, utcnow
from secapi.core.db.users import get_user
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.reasons import FailureReason
from secapi.core.scans.report import parse_report
from secapi.core.scans.store import store_results
from secapi.core.settings import Settings, Tier

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ResourceRef:
    """The identity of one generation of a Scan resource."""

    namespace: str
    name: str
    uid: str
    generation: int
    # The database id named by the API's label, for Scans the API created.
    claimed_scan_id: str | None


def resource_ref(body: Mapping[str, Any], *, scan_id_label: str) -> ResourceRef:
    metadata = body["metadata"]
    return ResourceRef(
        namespace=metadata["namespace"],
        name=metadata["name"],
        uid=metadata["uid"],
        generation=int(metadata.get("generation") or 1),
        claimed_scan_id=(metadata.get("labels") or {}).get(scan_id_label),
    )


class ScanRecords:
    """Database operations of the operator, each in its own transaction."""

    def __init__(
        self, session_factory: async_sessionmaker[AsyncSession], settings: Settings
    ) -> None:
        self._session_factory = session_factory
        self._settings = settings

    def _priority(self, tier: str) -> int:
        try:
            return self._settings.tiers.for_tier(Tier(tier)).queue_priority
        except ValueError:
            return 0

    async def get(self, scan_id: str) -> Scan | None:
        async with self._session_factory() as session:
            return await session.get(Scan, scan_id)

    async def claim(self, ref: ResourceRef, *, image: str, options: ScanOptions) -> Scan:
        """Return the row of this generation of a Scan resource, creating it when needed.

        The API's row is used when the resource names one that no other
        resource or generation has claimed. Otherwise a new row is made for
        the same owner, or for the namespace's cluster principal (GitOps).
        Rows of earlier generations that never ended are failed as replaced.
        """
        async with self._session_factory() as session:
            scan = await scan_resources.find_scan_of_generation(
                session, uid=ref.uid, generation=ref.generation
            )
            if scan is None:
                scan = await self._claim_new(session, ref, image=image, options=options)

            for old in await scan_resources.unfinished_scans_of_resource(
                session, uid=ref.uid, before_generation=ref.generation
            ):
                scan_resources.mark_failed(
                    old,
                    reason=FailureReason.INTERRUPTED.value,
                    message=f"the Scan's spec changed, so generation {ref.generation} "
                    f"replaced this scan of generation {old.k8s_generation}",
                )
                log.info(
                    "scan replaced by a newer generation", scan_id=old.id, namespace=ref.namespace
                )
            await session.commit()
            return scan

    async def _claim_new(
        self, session: AsyncSession, ref: ResourceRef, *, image: str, options: ScanOptions
    ) -> Scan:
        claimed = await session.get(Scan, ref.claimed_scan_id) if ref.claimed_scan_id else None
        if (
            claimed is not None
            and claimed.k8s_uid in (None, ref.uid)
            and claimed.k8s_generation in (None, ref.generation)
        ):
            scan_resources.link_scan_to_resource(
                claimed,
                namespace=ref.namespace,
                name=ref.name,
                uid=ref.uid,
                generation=ref.generation,
            )
            await session.flush()
            return claimed

        owner = await get_user(session, claimed.user_id) if claimed is not None else None
        if owner is None:
            owner = await scan_resources.get_or_add_cluster_principal(
                session, namespace=ref.namespace
            )
        scan = await scan_resources.add_resource_scan(
            session,
            user=owner,
            image=image,
            options=options.model_dump(mode="json"),
            priority=self._priority(owner.tier),
            namespace=ref.namespace,
            name=ref.name,
            uid=ref.uid,
            generation=ref.generation,
        )
        log.info(
            "scan record created for a Scan resource",
            scan_id=scan.id,
            user_id=owner.id,
            namespace=ref.namespace,
            name=ref.name,
            generation=ref.generation,
        )
        return scan

    async def mark_running(self, scan_id: str, *, started_at: datetime) -> Scan | None:
        """Move the row to running; return it, or None when it is gone."""
        async with self._session_factory() as session:
            scan = await session.get(Scan, scan_id)
            if scan is None:
                return None
            scan_resources.mark_running(scan, started_at=started_at)
            await session.commit()
            return scan

    async def mark_failed(self, scan_id: str, *, reason: str, message: str) -> Scan | None:
        """Fail the row unless it has ended; return the row as stored, or None when it is gone.

        The returned row carries the reason that was stored first, so a
        repeated call after a crash reports the same failure.
        """
        async with self._session_factory() as session:
            scan = await session.get(Scan, scan_id)
            if scan is None:
                return None
            if scan_resources.mark_failed(
                scan, reason=reason, message=message, completed_at=utcnow()
            ):
                await session.commit()
            return scan

    async def store_report(self, scan_id: str, report: bytes) -> Scan | None:
        """Parse a verified report and store its findings and summary in one transaction.

        Returns the completed row, the row unchanged when it had ended already,
        or None when it is gone. Raises the parser's error for an invalid report.
        """
        async with self._session_factory() as session:
            scan = await session.get(Scan, scan_id)
            if scan is None or ScanStatus(scan.status).is_final:
                return scan
        # Parsing thousands of findings takes a while: keep the event loop free.
        parsed = await asyncio.to_thread(parse_report, report)
        async with self._session_factory() as session:
            scan = await session.get(Scan, scan_id)
            if scan is None or ScanStatus(scan.status).is_final:
                return scan
            await store_results(session, scan=scan, report=parsed)
            await session.commit()
            return scan
