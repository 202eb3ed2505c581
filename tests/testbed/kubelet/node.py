"""The kubelet's Node object and its heartbeat.

The node advertises this machine's CPUs and memory, but the kubelet's
scheduler does not check resource requests against them. Readiness is kept
the way a kubelet does since Kubernetes 1.17: a Lease in `kube-node-lease`
renewed every 10 seconds, plus a node status update every minute.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
import uuid
from typing import Any

import urllib3

from .api import ApiError, KubeApi
from .status import api_time

logger = logging.getLogger(__name__)

KUBELET_VERSION = "v1.37.2"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40
LEASE_RENEW_SECONDS = 10.0
STATUS_UPDATE_SECONDS = 60.0

_ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}


def architecture() -> str:
    machine = platform.machine()
    return _ARCHITECTURES.get(machine, machine)


def _memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal line")


def node_resources(max_pods: int) -> dict[str, str]:
    """Return the node's capacity, which is also its allocatable amount."""
    return {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{_memory_bytes() // 1024}Ki",
        "pods": str(max_pods),
        "ephemeral-storage": "100Gi",
    }


def node_labels(name: str) -> dict[str, str]:
    return {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": architecture(),
        "node.kubernetes.io/instance-type": "secapi-testbed",
    }


# The conditions last changed when this kubelet started.
_STARTED_AT = api_time()


def node_status(port: int, resources: dict[str, str]) -> dict[str, Any]:
    """Return the status of a Ready node whose log server listens on `port`."""
    now = api_time()
    pressures = [
        ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
    ]
    conditions = [
        {
            "type": kind,
            "status": "False",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": _STARTED_AT,
        }
        for kind, reason, message in pressures
    ]
    conditions.append(
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": _STARTED_AT,
        }
    )
    return {
        "capacity": resources,
        "allocatable": resources,
        "conditions": conditions,
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": "localhost"},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "nodeInfo": {
            "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, platform.node()).hex,
            "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, platform.node())),
            "bootID": str(uuid.uuid4()),
            "kernelVersion": platform.release(),
            "osImage": "SecAPI test bed",
            "containerRuntimeVersion": "testbed://1.0",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": architecture(),
        },
    }


def register_node(api: KubeApi, name: str, port: int, resources: dict[str, str]) -> dict[str, Any]:
    """Create the Node, or take over an existing one, and mark it Ready."""
    path = f"/api/v1/nodes/{name}"
    try:
        api.create(
            "/api/v1/nodes",
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": node_labels(name)},
            },
        )
        logger.info("Registered node %s.", name)
    except ApiError as error:
        if error.status != 409:
            raise
        # Labels added by tests stay; the kubelet only resets its own.
        api.patch(path, {"metadata": {"labels": node_labels(name)}})
        logger.info("Node %s exists already; the kubelet takes it over.", name)
    node = api.patch(path + "/status", {"status": node_status(port, resources)})
    return _remove_condition_taints(api, node)


# The API server's TaintNodesByCondition admission gives every new Node the
# not-ready taint. The node lifecycle controller would remove it once the node
# reports Ready, but the bed does not run that controller.
_CONDITION_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def _remove_condition_taints(api: KubeApi, node: dict[str, Any]) -> dict[str, Any]:
    taints = node.get("spec", {}).get("taints") or []
    kept = [taint for taint in taints if taint.get("key") not in _CONDITION_TAINTS]
    if len(kept) == len(taints):
        return node
    name = node["metadata"]["name"]
    patch = {
        "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
        "spec": {"taints": kept or None},
    }
    node = api.request(
        "PATCH", f"/api/v1/nodes/{name}", body=patch, content_type="application/merge-patch+json"
    )
    logger.info(
        "Removed the not-ready taint from node %s, as the node lifecycle controller would.", name
    )
    return node


def _lease(name: str, node_uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}
            ],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": _micro_time(),
        },
    }


def _micro_time() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


class Heartbeat(threading.Thread):
    """Renews the node's Lease and re-sends its Ready status until stopped."""

    def __init__(self, api: KubeApi, name: str, port: int, resources: dict[str, str]) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self._api = api
        self._name = name
        self._port = port
        self._resources = resources
        self._stopped = threading.Event()
        self._failures = 0

    def stop(self) -> None:
        self._stopped.set()

    def beat(self, *, with_status: bool) -> None:
        """Renew the Lease (creating it, and the Node if a test deleted it), and optionally the status."""
        lease_path = (
            f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self._name}"
        )
        try:
            self._api.patch(
                lease_path, {"spec": {"holderIdentity": self._name, "renewTime": _micro_time()}}
            )
        except ApiError as error:
            if error.status != 404:
                raise
            node = self._node()
            self._api.create(
                f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases",
                _lease(self._name, node["metadata"]["uid"]),
            )
        if with_status:
            self._api.patch(
                f"/api/v1/nodes/{self._name}/status",
                {"status": node_status(self._port, self._resources)},
            )

    def _node(self) -> dict[str, Any]:
        try:
            return self._api.get(f"/api/v1/nodes/{self._name}")
        except ApiError as error:
            if error.status != 404:
                raise
            logger.warning("Node %s was deleted; the kubelet registers it again.", self._name)
            return register_node(self._api, self._name, self._port, self._resources)

    def run(self) -> None:
        last_status = time.monotonic()
        while not self._stopped.wait(LEASE_RENEW_SECONDS):
            due = time.monotonic() - last_status >= STATUS_UPDATE_SECONDS
            try:
                self.beat(with_status=due)
            except (ApiError, urllib3.exceptions.HTTPError, OSError) as error:
                self._failures += 1
                # One line per minute of failures is enough to see an outage.
                if self._failures == 1 or self._failures % 6 == 0:
                    logger.warning(
                        "The heartbeat of node %s failed %d time(s) in a row: %s",
                        self._name,
                        self._failures,
                        error,
                    )
                continue
            if self._failures:
                logger.info(
                    "The heartbeat of node %s works again after %d failure(s).",
                    self._name,
                    self._failures,
                )
                self._failures = 0
            if due:
                last_status = time.monotonic()
