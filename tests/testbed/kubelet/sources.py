"""Secrets, ConfigMaps and pod fields that containers read, fetched through the API.

Values read here end up in process environments and files only: nothing in
this module logs them, and errors name objects and keys, never values.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote

from .api import ApiError, KubeApi


class ConfigError(Exception):
    """A container cannot start yet because something it references is missing.

    The message follows the real kubelet's wording, for example
    `secret "registry-auth" not found`.
    """


class SourceCache:
    """Fetches each Secret and ConfigMap of one pod at most once."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self._api = api
        self._namespace = namespace
        self._objects: dict[tuple[str, str], dict[str, Any] | None] = {}

    def secret(self, name: str, *, optional: bool = False) -> dict[str, bytes] | None:
        """Return a Secret's decoded data, or None if it is missing and optional."""
        found = self._get("secrets", name, optional=optional)
        if found is None:
            return None
        return {key: base64.b64decode(value) for key, value in (found.get("data") or {}).items()}

    def config_map(self, name: str, *, optional: bool = False) -> dict[str, bytes] | None:
        """Return a ConfigMap's data and binaryData as bytes, or None if missing and optional."""
        found = self._get("configmaps", name, optional=optional)
        if found is None:
            return None
        data = {key: value.encode() for key, value in (found.get("data") or {}).items()}
        for key, value in (found.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value)
        return data

    def key(self, kind: str, reference: Mapping[str, Any]) -> bytes | None:
        """Return one key of a Secret or ConfigMap, as a `secretKeyRef` or `configMapKeyRef` names it."""
        name = reference.get("name", "")
        key = reference.get("key", "")
        optional = bool(reference.get("optional", False))
        data = (
            self.secret(name, optional=optional)
            if kind == "secret"
            else self.config_map(name, optional=optional)
        )
        if data is None:
            return None
        if key not in data:
            if optional:
                return None
            object_kind = "Secret" if kind == "secret" else "ConfigMap"
            raise ConfigError(f"couldn't find key {key} in {object_kind} {self._namespace}/{name}")
        return data[key]

    def _get(self, resource: str, name: str, *, optional: bool) -> dict[str, Any] | None:
        cache_key = (resource, name)
        if cache_key not in self._objects:
            path = f"/api/v1/namespaces/{quote(self._namespace)}/{resource}/{quote(name)}"
            try:
                self._objects[cache_key] = self._api.get(path)
            except ApiError as error:
                if error.status != 404:
                    raise
                self._objects[cache_key] = None
        found = self._objects[cache_key]
        if found is None and not optional:
            singular = "secret" if resource == "secrets" else "configmap"
            raise ConfigError(f'{singular} "{name}" not found')
        return found


_LABEL_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Mapping[str, Any], field_path: str) -> str:
    """Return the value of a `fieldRef` path, such as `metadata.name`."""
    metadata = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", ""),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        # The kubelet runs every process on this machine's loopback address.
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
    }
    if field_path in simple:
        return str(simple[field_path])
    match = _LABEL_FIELD.match(field_path)
    if match:
        return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ConfigError(f"unsupported fieldRef fieldPath {field_path!r}")


_SUFFIXES = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
}
_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


def parse_quantity(text: str) -> Decimal:
    """Parse a Kubernetes quantity such as `500m` or `1Gi`."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ConfigError(f"invalid quantity {text!r}")
    try:
        return Decimal(match.group(1)) * _SUFFIXES[match.group(2) or ""]
    except InvalidOperation as error:
        raise ConfigError(f"invalid quantity {text!r}") from error


def resource_value(
    container: Mapping[str, Any], reference: Mapping[str, Any], allocatable: Mapping[str, str]
) -> str:
    """Return a `resourceFieldRef` value: the limit or request, rounded up in units of the divisor.

    An unset limit falls back to the node's allocatable amount, as on a real node.
    """
    resource = reference.get("resource", "")
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    amount = (resources.get(kind) or {}).get(name)
    if amount is None:
        amount = allocatable.get(name, "0") if kind == "limits" else "0"
    divisor = parse_quantity(reference.get("divisor") or "1")
    if divisor == 0:
        raise ConfigError(f"resourceFieldRef {resource} has divisor 0")
    return str(math.ceil(parse_quantity(amount) / divisor))
