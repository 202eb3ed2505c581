"""The Scan custom resource as both the API and the operator see it.

The API's kubernetes executor writes Scan resources and the operator reads
them, and the two never import each other, so the resource's names, labels and
the mapping between its spec and `ScanOptions` live here, once. The CRD itself
is `crds/scans.secapi.io.yaml`.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Any

GROUP = "secapi.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Scan"
PLURAL = "scans"

# Labels. Values of label keys are limited to 63 characters (see `label_value`).
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
OPERATOR_MANAGER = "secapi-operator"
API_MANAGER = "secapi-api"
SCAN_ID_LABEL = "secapi.io/scan-id"
SCAN_LABEL = "secapi.io/scan"
SCAN_UID_LABEL = "secapi.io/scan-uid"
GENERATION_LABEL = "secapi.io/generation"
USER_ID_LABEL = "secapi.io/user-id"

# Annotation prefix of the operator's own bookkeeping, so GitOps tools that
# compare the manifests they applied see no drift in other keys.
ANNOTATION_PREFIX = "secapi.io"

MAX_LABEL_VALUE = 63
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DURATION = re.compile(r"^(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?$")


class Phase(StrEnum):
    """`status.phase` of a Scan."""

    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"

    @property
    def is_final(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED)


def label_value(text: str) -> str:
    """Return `text` if it is a valid label value, else a shortened form with a hash suffix.

    Scan names may be up to 253 characters and contain dots, label values only
    63, so a long name keeps its first 52 characters plus 10 hex digits of its
    SHA-256. The result is deterministic, so selectors can be computed again.
    """
    if len(text) <= MAX_LABEL_VALUE and _LABEL_VALUE.match(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    head = re.sub(r"[^-A-Za-z0-9_.]", "-", text)[: MAX_LABEL_VALUE - len(digest) - 1]
    head = head.strip("-_.")
    return f"{head}-{digest}" if head else digest


def parse_duration(text: str) -> int:
    """Return the seconds of a duration such as `90s`, `10m` or `1h30m`.

    Raises ValueError naming the value when it is not such a duration.
    """
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise ValueError(
            f"invalid duration {text!r}: write hours, minutes and seconds such as 90s, 10m or 1h30m"
        )
    hours, minutes, seconds = (int(match.group(unit) or 0) for unit in ("h", "m", "s"))
    return hours * 3600 + minutes * 60 + seconds


def format_duration(seconds: int) -> str:
    """Return `seconds` as the shortest duration string that `parse_duration` reads back."""
    if seconds < 0:
        raise ValueError(f"invalid duration of {seconds} seconds: it must not be negative")
    hours, rest = divmod(seconds, 3600)
    minutes, rest = divmod(rest, 60)
    text = "".join(
        f"{value}{unit}" for value, unit in ((hours, "h"), (minutes, "m"), (rest, "s")) if value
    )
    return text or "0s"


def scan_resource_name(scan_id: str) -> str:
    """Return the name of the Scan resource the API creates for a database scan id."""
    return f"scan-{scan_id}"


def status_of(body: dict[str, Any]) -> dict[str, Any]:
    """Return the status of a Scan resource, an empty dict when it has none yet."""
    status = body.get("status")
    return status if isinstance(status, dict) else {}
