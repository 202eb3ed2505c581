"""The API's "kubernetes" executor: every submitted scan becomes a Scan resource.

The scan service commits the scan's row before `submit` runs. This executor
then creates the Scan resource in `settings.namespace`, labelled with the
scan's id, and the operator does the rest. When the API server cannot be
reached or refuses, `submit` raises ServiceUnavailableError, so the service
fails the row with a reason and answers 503: no row waits for a Scan that
does not exist. The executor only talks to the Kubernetes API (no Kopf).
"""

from __future__ import annotations

from typing import Any

import structlog

from secapi.core.db.models import Scan
from secapi.core.errors import ServiceUnavailableError
from secapi.core.executors.base import EarlyStart
from secapi.core.executors.kube_client import (
    KubeApiError,
    KubeClient,
    KubeUnreachableError,
    load_configuration,
)
from secapi.core.executors.scan_resource import (
    API_MANAGER,
    API_VERSION,
    KIND,
    MANAGED_BY_LABEL,
    SCAN_ID_LABEL,
    USER_ID_LABEL,
    scan_resource_name,
)
from secapi.core.executors.scan_spec import spec_from_options
from secapi.core.scans.options import ScanOptions
from secapi.core.settings import Settings

log = structlog.get_logger(__name__)

# Error code of ServiceUnavailableError raised here; the service stores it as the reason.
EXECUTOR_UNAVAILABLE = "ExecutorUnavailable"


def build_scan_resource(scan: Scan, *, namespace: str) -> dict[str, Any]:
    """Return the Scan resource the API creates for a scan row."""
    options = ScanOptions.model_validate(scan.options or {})
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": scan_resource_name(scan.id),
            "namespace": namespace,
            "labels": {
                MANAGED_BY_LABEL: API_MANAGER,
                SCAN_ID_LABEL: scan.id,
                USER_ID_LABEL: scan.user_id,
            },
        },
        "spec": spec_from_options(image=scan.image, options=options),
    }


class KubernetesExecutor:
    """Runs scans as Scan resources, through the operator."""

    name = "kubernetes"

    def __init__(self, settings: Settings, *, client: KubeClient | None = None) -> None:
        self._settings = settings
        self._client = client

    def _kube(self) -> KubeClient:
        if self._client is None:
            try:
                self._client = KubeClient(load_configuration(), max_workers=4, timeout=(3.0, 15.0))
            except KubeUnreachableError as error:
                raise ServiceUnavailableError(str(error), code=EXECUTOR_UNAVAILABLE) from error
        return self._client

    async def start(self) -> None:
        """Load the credentials now, so a missing kubeconfig is logged at startup instead of raised."""
        try:
            self._kube()
        except ServiceUnavailableError as error:
            log.warning("kubernetes executor has no credentials yet", error=error.message)

    async def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def start_before_commit(self, scan: Scan) -> EarlyStart | None:
        """Return None: the operator reads the row, so the Scan resource waits for the commit."""
        return None

    async def submit(self, scan: Scan) -> None:
        """Create the Scan resource of a committed scan row.

        A resource of that name that exists already is taken as created by an
        earlier try. Raises ServiceUnavailableError for every other failure.
        """
        namespace = self._settings.namespace
        body = build_scan_resource(scan, namespace=namespace)
        try:
            await self._kube().create_scan(namespace, body)
        except KubeApiError as error:
            if error.status != 409:
                raise self._unavailable("creating", scan, error) from error
        except KubeUnreachableError as error:
            raise self._unavailable("creating", scan, error) from error
        log.info(
            "scan resource created",
            scan_id=scan.id,
            user_id=scan.user_id,
            namespace=namespace,
            name=body["metadata"]["name"],
        )

    async def cancel(self, scan: Scan) -> None:
        """Delete a scan's Scan resource; its Job and pod go with it. A missing one is fine."""
        namespace = scan.k8s_namespace or self._settings.namespace
        name = scan.k8s_name or scan_resource_name(scan.id)
        try:
            deleted = await self._kube().delete_scan(namespace, name)
        except (KubeApiError, KubeUnreachableError) as error:
            raise self._unavailable("deleting", scan, error) from error
        if deleted:
            log.info("scan resource deleted", scan_id=scan.id, namespace=namespace, name=name)

    async def check_ready(self) -> None:
        """Raise ServiceUnavailableError unless Scans in the namespace can be listed."""
        namespace = self._settings.namespace
        try:
            await self._kube().list_scans(namespace, limit=1)
        except (KubeApiError, KubeUnreachableError) as error:
            raise ServiceUnavailableError(
                f"the Kubernetes API does not serve Scans in namespace {namespace}: {error}; "
                "check the API server, the Scan CRD and the API's RBAC rules",
                code=EXECUTOR_UNAVAILABLE,
            ) from error

    def _unavailable(
        self, action: str, scan: Scan, error: KubeApiError | KubeUnreachableError
    ) -> ServiceUnavailableError:
        log.warning(
            f"{action} a scan resource failed",
            scan_id=scan.id,
            namespace=self._settings.namespace,
            error=str(error),
        )
        if isinstance(error, KubeApiError) and error.status in (401, 403):
            hint = "the API's service account lacks a permission on scans.secapi.io"
        elif isinstance(error, KubeApiError) and error.status == 404:
            hint = "the Scan CRD is not installed or the namespace does not exist"
        else:
            hint = "the Kubernetes API server could not be reached; try again shortly"
        return ServiceUnavailableError(
            f"{action} the Scan resource of scan {scan.id} failed: {hint} ({error})",
            code=EXECUTOR_UNAVAILABLE,
        )
