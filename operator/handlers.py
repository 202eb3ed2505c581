"""Kopf handler registrations: thin, they only start the app and wake the reconcile loop.

This file is what `kopf run` loads (`secapi operator` imports it). All state
changes happen in the reconcile loop (`reconciler.py`), so no handler needs
Kopf's per-object progress storage, and none adds a finalizer: a Scan can
always be deleted, with or without a running operator. Kopf's storages are
still set to secapi.io keys so nothing of Kopf's ever appears under its own
names in a manifest that a GitOps tool compares.
"""

from __future__ import annotations

from typing import Any

import kopf

from secapi.core.executors.scan_resource import (
    ANNOTATION_PREFIX,
    GROUP,
    MANAGED_BY_LABEL,
    OPERATOR_MANAGER,
    PLURAL,
    VERSION,
)
from secapi.core.settings import get_settings
from secapi.operator.app import OperatorApp, namespaces_from_environment

MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={OPERATOR_MANAGER}"


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Watch only the named namespaces and the CRDs present at startup, so the
    # operator needs no cluster-wide list rights on namespaces and CRDs.
    settings.scanning.disabled = True
    # Only Jobs and pods of scans reach the operator, filtered by the API server.
    settings.watching.label_selectors["batch", "v1", "jobs"] = MANAGED_SELECTOR
    settings.watching.label_selectors["v1", "pods"] = MANAGED_SELECTOR
    # Reconnect watches now and then, and notice a dead connection quickly.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # State changes are posted as Events by the reconcile loop; Kopf posts only its warnings.
    settings.posting.level = 30

    app = OperatorApp.build(get_settings(), namespaces=namespaces_from_environment())
    app.start()
    memo["secapi"] = app


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    app: OperatorApp | None = memo.get("secapi")
    if app is not None:
        await app.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def scan_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    app: OperatorApp = memo["secapi"]
    if namespace:
        app.reconciler.watch_namespace(namespace)
    if event.get("type") == "DELETED":
        await app.reconciler.forget(dict(body))
    app.reconciler.wake()


@kopf.on.event("batch", "v1", "jobs", labels={MANAGED_BY_LABEL: OPERATOR_MANAGER})
async def job_event(memo: kopf.Memo, **_: Any) -> None:
    memo["secapi"].reconciler.wake()


@kopf.on.event("", "v1", "pods", labels={MANAGED_BY_LABEL: OPERATOR_MANAGER})
async def pod_event(memo: kopf.Memo, **_: Any) -> None:
    memo["secapi"].reconciler.wake()
