"""Async access to the Kubernetes API with plain-dict objects, for the API and the operator.

The official `kubernetes` client is synchronous, so every call runs in a
small thread pool of its own and never blocks the event loop (or starves the
loop's default executor, which Kopf uses for its own work). Objects go in and
come out as the JSON dicts the API server sends, like the manifests the
builders return, instead of the generated model classes.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from secapi.core.executors.scan_resource import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
# Seconds to wait for a connection, and for the response to an ordinary request.
DEFAULT_TIMEOUT = (5.0, 30.0)


class KubeApiError(Exception):
    """The API server responded with an error status."""

    def __init__(self, *, status: int, reason: str, message: str) -> None:
        super().__init__(f"the Kubernetes API answered HTTP {status} ({reason}): {message}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeUnreachableError(Exception):
    """The API server could not be reached or did not respond in time."""


def load_configuration(kubeconfig: str | None = None) -> k8s.Configuration:
    """Return the client configuration: in-cluster when run in a pod, else the kubeconfig.

    `kubeconfig` overrides KUBECONFIG. Raises KubeUnreachableError when
    neither source has credentials.
    """
    configuration = k8s.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            # The client reads KUBECONFIG once, at import; read it now, so a change counts.
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig or os.environ.get("KUBECONFIG") or None,
                client_configuration=configuration,
                persist_config=False,
            )
    except (ConfigException, OSError) as error:
        raise KubeUnreachableError(
            f"no Kubernetes credentials: {error}; run in a pod with a service account, "
            "or set KUBECONFIG to a kubeconfig file"
        ) from error
    return configuration


def _api_error(*, status: int, reason: str, raw: bytes | str | None) -> KubeApiError:
    """Build the error of a response, with the reason and message of its Status body."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or "")
    message = text[:500]
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        reason = str(body.get("reason") or reason)
        message = str(body.get("message") or "")
    return KubeApiError(status=status, reason=reason, message=message)


class KubeClient:
    """The calls SecAPI makes, each one async; methods return decoded JSON dicts.

    Methods raise KubeApiError for error responses and KubeUnreachableError when
    the server cannot be reached. `get_*` methods return None for 404.
    """

    def __init__(
        self,
        configuration: k8s.Configuration,
        *,
        max_workers: int = 8,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    ) -> None:
        configuration.connection_pool_maxsize = max(max_workers, 4)
        self._api_client = k8s.ApiClient(configuration)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kube")
        self._timeout = timeout

    @property
    def host(self) -> str:
        return str(self._api_client.configuration.host)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._api_client.close()  # type: ignore[no-untyped-call]

    def _send(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None,
        body: Any,
        content_type: str,
        timeout: tuple[float, float],
    ) -> bytes:
        """Send one request in the calling thread and return the body of a 2xx response."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, body, _ = self._api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=[(key, value) for key, value in (query or {}).items()],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api_client.call_api(
            method, url, header_params=headers, body=body, _request_timeout=timeout
        )
        data: bytes = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            raise _api_error(status=response.status, reason=str(response.reason or ""), raw=data)
        return data

    async def request_raw(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        request_timeout: tuple[float, float] | None = None,
    ) -> bytes:
        """Send one request from a worker thread and return the response body."""
        call = partial(
            self._send, method, path, query, body, content_type, request_timeout or self._timeout
        )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, call)
        except ApiException as error:
            raise _api_error(
                status=int(error.status or 0), reason=str(error.reason or ""), raw=error.body
            ) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeUnreachableError(
                f"the Kubernetes API server at {self.host} could not be reached: {error}"
            ) from error

    async def request(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        """Send one request and return the decoded JSON response."""
        data = await self.request_raw(method, path, **options)
        decoded: dict[str, Any] = json.loads(data) if data else {}
        return decoded

    async def _request_or_none(
        self, method: str, path: str, **options: Any
    ) -> dict[str, Any] | None:
        try:
            return await self.request(method, path, **options)
        except KubeApiError as error:
            if error.status == 404:
                return None
            raise

    # Scans

    async def list_scans(
        self, namespace: str, *, label_selector: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if label_selector:
            query["labelSelector"] = label_selector
        if limit:
            query["limit"] = limit
        result = await self.request("GET", scans_path(namespace), query=query)
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def get_scan(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._request_or_none("GET", scans_path(namespace, name))

    async def create_scan(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", scans_path(namespace), body=body)

    async def delete_scan(self, namespace: str, name: str) -> bool:
        """Delete a Scan; return False when it did not exist."""
        result = await self._request_or_none("DELETE", scans_path(namespace, name))
        return result is not None

    async def patch_scan_status(
        self, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch a Scan's status; return None when the Scan is gone."""
        return await self._request_or_none(
            "PATCH",
            scans_path(namespace, name) + "/status",
            body={"status": status},
            content_type=MERGE_PATCH,
        )

    # Jobs, pods and events

    async def list_jobs(self, namespace: str, *, label_selector: str) -> list[dict[str, Any]]:
        result = await self.request(
            "GET",
            f"/apis/batch/v1/namespaces/{quote(namespace)}/jobs",
            query={"labelSelector": label_selector},
        )
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._request_or_none(
            "GET", f"/apis/batch/v1/namespaces/{quote(namespace)}/jobs/{quote(name)}"
        )

    async def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "POST", f"/apis/batch/v1/namespaces/{quote(namespace)}/jobs", body=body
        )

    async def delete_job(self, namespace: str, name: str, *, uid: str | None = None) -> bool:
        """Delete a Job and, in the background, its pods; return False when it did not exist.

        With `uid`, only that incarnation of the name is deleted.
        """
        options: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
        }
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            result = await self._request_or_none(
                "DELETE",
                f"/apis/batch/v1/namespaces/{quote(namespace)}/jobs/{quote(name)}",
                body=options,
            )
        except KubeApiError as error:
            # A failed uid precondition means that incarnation is gone already.
            if error.status == 409 and uid:
                return False
            raise
        return result is not None

    async def list_pods(self, namespace: str, *, label_selector: str) -> list[dict[str, Any]]:
        result = await self.request(
            "GET",
            f"/api/v1/namespaces/{quote(namespace)}/pods",
            query={"labelSelector": label_selector},
        )
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def read_pod_log(
        self,
        namespace: str,
        name: str,
        *,
        container: str,
        limit_bytes: int | None = None,
        tail_lines: int | None = None,
        request_timeout: tuple[float, float] = (5.0, 120.0),
    ) -> bytes | None:
        """Return a container's log as bytes; None when the pod is gone."""
        query: dict[str, Any] = {"container": container}
        if limit_bytes is not None:
            query["limitBytes"] = limit_bytes
        if tail_lines is not None:
            query["tailLines"] = tail_lines
        try:
            return await self.request_raw(
                "GET",
                f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}/log",
                query=query,
                request_timeout=request_timeout,
            )
        except KubeApiError as error:
            if error.status == 404:
                return None
            raise

    async def create_event(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "POST", f"/api/v1/namespaces/{quote(namespace)}/events", body=body
        )


def scans_path(namespace: str, name: str | None = None) -> str:
    """Return the API path of a namespace's Scans, or of one Scan."""
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}"
    return f"{path}/{quote(name)}" if name else path
