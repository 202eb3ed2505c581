"""The operator's long-lived parts, built once at startup and closed at cleanup.

Kopf's startup handler builds an `OperatorApp` and keeps it in Kopf's memo,
which every handler receives; nothing is kept in module globals, so several
operators can run in one test process one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.executors.kube_client import KubeClient, load_configuration
from secapi.core.settings import Settings
from secapi.operator.reconciler import Reconciler
from secapi.operator.records import ScanRecords

log = structlog.get_logger(__name__)

# Comma-separated namespaces the reconcile loop covers from the start; `secapi
# operator` sets it from its --namespace options. Namespaces of Scans that
# Kopf's watch reports are added as they appear.
NAMESPACES_VARIABLE = "SECAPI_OPERATOR_NAMESPACES"


def namespaces_from_environment() -> list[str]:
    raw = os.environ.get(NAMESPACES_VARIABLE, "")
    return [name.strip() for name in raw.split(",") if name.strip()]


@dataclass
class OperatorApp:
    settings: Settings
    engine: AsyncEngine
    kube: KubeClient
    reconciler: Reconciler
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings, *, namespaces: Iterable[str]) -> OperatorApp:
        engine = create_engine(settings)
        kube = KubeClient(load_configuration())
        records = ScanRecords(create_session_factory(engine), settings)
        reconciler = Reconciler(
            kube=kube, records=records, settings=settings, namespaces=namespaces
        )
        return cls(settings=settings, engine=engine, kube=kube, reconciler=reconciler)

    def start(self) -> None:
        self.tasks.append(asyncio.create_task(self.reconciler.run(), name="secapi-reconcile"))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.kube.close()
        await self.engine.dispose()
        log.info("operator stopped")
