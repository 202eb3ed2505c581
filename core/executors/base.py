"""The executor protocol: where scans run, as the scan service uses it.

The service commits a pending scan row and then hands it to the executor.
The local executor runs Trivy processes on this machine; the kubernetes
executor creates a Scan resource for the operator. Either way the database
row is the record, and the executor moves it to running, completed or failed.

An executor that can start a scan at once may take it before the row
commits (``start_before_commit``), so the commit's round trips overlap the
scan instead of delaying it. It then runs nothing that lasts until the
service confirms the commit, and stops the scan if the commit fails.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from secapi.core.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from secapi.core.db.models import Scan


class EarlyStart:
    """A scan an executor started before its row committed, waiting for the commit's outcome."""

    def __init__(self) -> None:
        self._committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def confirm(self) -> None:
        """Report that the row is committed, so the scan may write its results."""
        if not self._committed.done():
            self._committed.set_result(True)

    def abandon(self) -> None:
        """Report that the row was not committed, so the scan stops and writes nothing."""
        if not self._committed.done():
            self._committed.set_result(False)

    async def committed(self) -> bool:
        """Wait for ``confirm`` or ``abandon``; return whether the row was committed."""
        return await asyncio.shield(self._committed)


class Executor(Protocol):
    # "local" or "kubernetes"; stored in scans.executor.
    name: str

    async def start(self) -> None:
        """Start background work (the local executor's worker pool)."""

    async def stop(self) -> None:
        """Stop background work. Running scans end and go back to the queue for the next start."""

    def start_before_commit(self, scan: Scan) -> EarlyStart | None:
        """Start ``scan`` now if it can start at once, before its row commits.

        ``scan`` carries its id and fields but is not committed. Returns None
        when the scan cannot start at once; the service then calls ``submit``
        after the commit. Otherwise the service calls ``confirm`` or
        ``abandon`` on the returned EarlyStart, and never ``submit``.
        """

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
