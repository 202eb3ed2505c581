"""A small JSON client for the Kubernetes API, shared by the kubelet's threads.

The kubelet works with plain dictionaries instead of the generated client's
models: it needs only a dozen calls, the models lag behind new API fields, and
decoding every watch event into models costs CPU that 200 pods make visible.
The kubeconfig is still read by the official `kubernetes` package, so every
credential form it supports (client certificates, tokens) works here too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

logger = logging.getLogger(__name__)

# Seconds to wait for a connection and for the response to an ordinary request.
REQUEST_TIMEOUT = (5.0, 30.0)


class ApiError(Exception):
    """The API server returned an error status for a request."""

    def __init__(self, *, method: str, path: str, status: int, reason: str, message: str) -> None:
        super().__init__(f"{method} {path} failed with HTTP {status} ({reason}): {message}")
        self.status = status
        self.reason = reason
        self.message = message


def _error_from(method: str, path: str, response: urllib3.BaseHTTPResponse) -> ApiError:
    raw = response.data
    reason = response.reason or ""
    message = raw.decode("utf-8", "replace").strip()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        reason = str(body.get("reason", reason))
        message = str(body.get("message", message))
    return ApiError(
        method=method, path=path, status=response.status, reason=reason, message=message
    )


def pod_path(namespace: str, name: str, subresource: str = "") -> str:
    """Return the API path of a pod, or of one of its subresources."""
    path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}"
    return f"{path}/{subresource}" if subresource else path


class KubeApi:
    """Thread-safe access to one API server with the credentials of a kubeconfig."""

    def __init__(self, kubeconfig: Path, *, max_connections: int = 32) -> None:
        configuration = k8s_client.Configuration()
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig),
            client_configuration=configuration,
            persist_config=False,
        )
        self._base_url = configuration.host.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "secapi-testbed-kubelet"}
        settings: dict[str, Any] = dict(configuration.auth_settings())
        for setting in settings.values():
            if setting.get("in") == "header" and setting.get("value"):
                self._headers[setting["key"]] = setting["value"]

        # NOTE: block=True makes a thread wait for a free connection instead of
        # opening throwaway ones when many pod threads report status at once.
        self._pool = urllib3.PoolManager(
            num_pools=2,
            maxsize=max_connections,
            block=True,
            cert_reqs="CERT_REQUIRED" if configuration.verify_ssl else "CERT_NONE",
            ca_certs=configuration.ssl_ca_cert,
            cert_file=configuration.cert_file,
            key_file=configuration.key_file,
            retries=False,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """Send one request and return the decoded JSON response.

        Raises `ApiError` for an error status and urllib3's exceptions when the
        server cannot be reached.
        """
        url = self._url(path, query)
        headers = dict(self._headers)
        payload = None
        if body is not None:
            headers["Content-Type"] = content_type
            payload = json.dumps(body).encode()
        response = self._pool.request(
            method,
            url,
            body=payload,
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
        )
        if response.status >= 400:
            raise _error_from(method, path, response)
        if not response.data:
            return {}
        decoded: dict[str, Any] = json.loads(response.data)
        return decoded

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        return self.request("GET", path, query=query or None)

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a strategic merge patch, the patch type the real kubelet sends."""
        return self.request(
            "PATCH", path, body=body, content_type="application/strategic-merge-patch+json"
        )

    def delete(self, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.request("DELETE", path, body=body)

    def watch(
        self, path: str, *, query: Mapping[str, Any], timeout_seconds: int = 290
    ) -> Iterator[dict[str, Any]]:
        """Yield the events of one watch request until the server ends it.

        The server closes the stream after `timeout_seconds`; the read timeout
        is a minute longer, so only a dead connection raises a timeout.
        """
        full_query = {**query, "watch": "true", "timeoutSeconds": str(timeout_seconds)}
        response = self._pool.request(
            "GET",
            self._url(path, full_query),
            headers=self._headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=REQUEST_TIMEOUT[0], read=timeout_seconds + 60),
        )
        finished = False
        try:
            if response.status >= 400:
                response.read()
                finished = True
                raise _error_from("WATCH", path, response)

            # Each event is one JSON document on its own line.
            pending = b""
            for chunk in response.stream(64 * 1024, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            finished = True
        finally:
            # A connection with unread data must not go back to the pool.
            if not finished:
                response.close()
            response.release_conn()

    def _url(self, path: str, query: Mapping[str, Any] | None) -> str:
        url = self._base_url + path
        if query:
            url += "?" + urlencode({key: str(value) for key, value in query.items()})
        return url
