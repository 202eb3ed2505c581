"""The executor protocol: where scans run, as the scan service uses it.

The service commits a pending scan row and then hands it to the executor.
The local executor runs Trivy processes on this machine; the kubernetes
executor creates a Scan resource for the operator. Either way the database
row is the record, and the executor moves it to running, completed or failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from secapi.core.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from secapi.core.db.models import Scan


class Executor(Protocol):
    # "local" or "kubernetes"; stored in scans.executor.
    name: str

    async def start(self) -> None:
        """Start background work (the local executor's worker pool)."""

    async def stop(self) -> None:
        """Stop background work. Running scans end and go back to the queue for the next start."""

    async def submit(self, scan: Scan) -> None:
        """Take a committed pending scan; raise ServiceUnavailableError when that is impossible."""

    async def cancel(self, scan: Scan) -> None:
        """Stop a scan that is being deleted: kill its process or delete its Scan resource."""

    async def check_ready(self) -> None:
        """Raise ServiceUnavailableError, with the reason, when scans cannot run now."""


def create_executor(
    settings: Settings, session_factory: async_sessionmaker[AsyncSession]
) -> Executor:
    """Return the executor that ``settings.executor`` names.

    The kubernetes executor is imported only when chosen, so the embedded
    mode never loads the Kubernetes client.
    """
    if settings.executor == "kubernetes":
        from secapi.core.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor(settings)

    from secapi.core.executors.local import LocalExecutor

    return LocalExecutor(settings, session_factory)
