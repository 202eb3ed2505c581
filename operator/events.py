"""Kubernetes Events for a Scan's state changes, shown by `kubectl describe scan`.

The operator posts them itself (core/v1 Events through the same client as
everything else) instead of through Kopf's poster, which only works inside a
handler's task, while state changes happen in the reconcile loop.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from secapi.core.executors.scan_resource import API_VERSION, KIND
from secapi.operator.status import shorten, timestamp

COMPONENT = "secapi-operator"
NORMAL = "Normal"
WARNING = "Warning"
# Events allow 1 KiB messages; longer ones are cut.
MAX_EVENT_MESSAGE = 1024


def reporting_instance() -> str:
    """Return the operator's instance name: the pod name in a cluster, else the host name."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


def build_event(
    scan: Mapping[str, Any], *, kind: str, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """Return a core/v1 Event about a Scan."""
    metadata = scan["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": f"{metadata['name'][:200]}.",
            "namespace": metadata["namespace"],
        },
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
        },
        "type": kind,
        "reason": reason,
        "message": shorten(message, MAX_EVENT_MESSAGE),
        "firstTimestamp": timestamp(now),
        "lastTimestamp": timestamp(now),
        "count": 1,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": reporting_instance()[:128],
    }
