"""Queries that tie database scans to Scan resources in Kubernetes.

A Scan resource is identified by its uid, and each change of its spec (a new
metadata.generation) is a scan of its own, so a database scan row records the
resource's namespace, name, uid and generation. Scans applied with kubectl
(GitOps) have no user: they belong to one cluster principal per namespace.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from secapi.core.db.models import PrincipalKind, Scan, ScanStatus, User, utcnow
from secapi.core.errors import ConflictError
from secapi.core.settings import Tier

KUBERNETES_EXECUTOR = "kubernetes"


def cluster_principal_email(namespace: str) -> str:
    """Return the identifier of the cluster principal that owns a namespace's GitOps scans.

    It is stored in the email column. `get_or_add_cluster_principal` checks
    the row's kind, so a user who registered this address never gets the scans.
    """
    return f"kubernetes:namespace:{namespace}@cluster.secapi.invalid"


async def get_or_add_cluster_principal(session: AsyncSession, *, namespace: str) -> User:
    """Return the cluster principal of a namespace, inserting it the first time.

    Flushes but does not commit. A concurrent insert of the same principal is
    resolved by reading the row that won.
    """
    email = cluster_principal_email(namespace)
    result = await session.execute(select(User).where(User.email == email))
    user = result.scalar_one_or_none()
    if user is not None and user.kind != PrincipalKind.CLUSTER.value:
        raise ConflictError(
            f"the address {email!r} of namespace {namespace}'s cluster principal belongs to a "
            "user account; delete that account so the namespace's Scans can be recorded",
            code="cluster_principal_taken",
        )
    if user is not None:
        return user

    user = User(email=email, kind=PrincipalKind.CLUSTER.value, tier=Tier.FREE.value)
    try:
        async with session.begin_nested():
            session.add(user)
    except IntegrityError:
        result = await session.execute(select(User).where(User.email == email))
        return result.scalar_one()
    return user


async def find_scan_of_generation(
    session: AsyncSession, *, uid: str, generation: int
) -> Scan | None:
    """Return the scan row of one generation of a Scan resource, if there is one."""
    result = await session.execute(
        select(Scan)
        .where(Scan.k8s_uid == uid, Scan.k8s_generation == generation)
        .order_by(Scan.created_at)
        .limit(1)
    )
    return result.scalar_one_or_none()


async def unfinished_scans_of_resource(
    session: AsyncSession, *, uid: str, before_generation: int
) -> list[Scan]:
    """Return the pending or running rows of a Scan resource's earlier generations."""
    result = await session.execute(
        select(Scan).where(
            Scan.k8s_uid == uid,
            Scan.k8s_generation < before_generation,
            Scan.status.in_([ScanStatus.PENDING.value, ScanStatus.RUNNING.value]),
        )
    )
    return list(result.scalars())


def link_scan_to_resource(
    scan: Scan, *, namespace: str, name: str, uid: str, generation: int
) -> None:
    """Record which Scan resource and generation a scan row belongs to."""
    scan.executor = KUBERNETES_EXECUTOR
    scan.k8s_namespace = namespace
    scan.k8s_name = name
    scan.k8s_uid = uid
    scan.k8s_generation = generation


async def add_resource_scan(
    session: AsyncSession,
    *,
    user: User,
    image: str,
    options: dict[str, Any],
    priority: int,
    namespace: str,
    name: str,
    uid: str,
    generation: int,
) -> Scan:
    """Insert the pending row of one generation of a Scan resource and flush."""
    scan = Scan(
        user_id=user.id,
        image=image,
        options=options,
        priority=priority,
        status=ScanStatus.PENDING.value,
    )
    link_scan_to_resource(scan, namespace=namespace, name=name, uid=uid, generation=generation)
    session.add(scan)
    await session.flush()
    return scan


def mark_running(scan: Scan, *, started_at: datetime) -> bool:
    """Move a pending scan to running; return False when it was not pending."""
    if scan.status != ScanStatus.PENDING.value:
        return False
    scan.status = ScanStatus.RUNNING.value
    scan.started_at = started_at
    scan.attempts += 1
    return True


def mark_failed(
    scan: Scan, *, reason: str, message: str, completed_at: datetime | None = None
) -> bool:
    """Fail a scan that has not ended; return False when it had ended already."""
    if ScanStatus(scan.status).is_final:
        return False
    scan.status = ScanStatus.FAILED.value
    scan.reason = reason
    scan.message = message
    scan.completed_at = completed_at or utcnow()
    return True
