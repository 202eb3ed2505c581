"""Pod status as the kubelet reports it: container states, phase and conditions.

These builders do no I/O. The runtime keeps a `ContainerState` per container
and sends what `pod_status` returns as a strategic merge patch of
`pods/NAME/status`, the way the real kubelet's status manager does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# The address every pod gets: all processes run on this machine's loopback.
POD_IP = "127.0.0.1"


def api_time(seconds: float | None = None) -> str:
    """Format Unix seconds (default: now) as the API's RFC 3339 time with second precision."""
    return time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if seconds is None else seconds)
    )


@dataclass
class ContainerState:
    """The kubelet's record of one container of a pod."""

    name: str
    image: str
    state: str = "waiting"  # waiting, running or terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    restart_count: int = 0
    container_id: str = ""
    last_terminated: dict[str, Any] | None = None

    @property
    def succeeded(self) -> bool:
        return self.state == "terminated" and self.exit_code == 0

    def wait(self, reason: str, message: str = "") -> None:
        self.state, self.reason, self.message = "waiting", reason, message

    def run(self, container_id: str, started_at: float) -> None:
        self.state, self.reason, self.message = "running", "", ""
        self.container_id = container_id
        self.started_at = started_at
        self.finished_at = self.exit_code = None

    def terminate(
        self, exit_code: int, reason: str, message: str = "", finished_at: float | None = None
    ) -> None:
        self.state, self.reason, self.message = "terminated", reason, message
        self.exit_code = exit_code
        self.finished_at = time.time() if finished_at is None else finished_at

    def _terminated(self) -> dict[str, Any]:
        terminated: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": api_time(self.started_at) if self.started_at else None,
            "finishedAt": api_time(self.finished_at),
        }
        if self.message:
            terminated["message"] = self.message
        if self.container_id:
            terminated["containerID"] = self.container_id
        return terminated

    def restart(self) -> None:
        """Keep the ended run as `lastState` before the container runs again."""
        self.last_terminated = self._terminated()
        self.restart_count += 1
        self.wait("ContainerCreating")

    def to_status(self) -> dict[str, Any]:
        """Return the container's entry of `containerStatuses`."""
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": api_time(self.started_at)}}
        elif self.state == "terminated":
            state = {"terminated": self._terminated()}
        else:
            waiting: dict[str, Any] = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {"waiting": waiting}
        started = self.state != "waiting"
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            # There is no image store, so the image reference replaces the digest.
            "imageID": self.image if started else "",
            "ready": self.state == "running",
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


class Conditions:
    """A pod's conditions, with transition times that change only when a status changes."""

    def __init__(self) -> None:
        self._conditions: dict[str, dict[str, Any]] = {}

    def set(self, kind: str, status: bool, reason: str = "", message: str = "") -> None:
        value = "True" if status else "False"
        previous = self._conditions.get(kind)
        changed_at = (
            previous["lastTransitionTime"]
            if previous and previous["status"] == value
            else api_time()
        )
        condition: dict[str, Any] = {
            "type": kind,
            "status": value,
            "lastProbeTime": None,
            "lastTransitionTime": changed_at,
        }
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        self._conditions[kind] = condition

    def to_list(self) -> list[dict[str, Any]]:
        return list(self._conditions.values())


def pod_phase(init: list[ContainerState], main: list[ContainerState], restart_policy: str) -> str:
    """Return the pod phase that the container states amount to."""
    if any(state.state == "terminated" and not state.succeeded for state in init):
        return "Failed" if restart_policy == "Never" else "Pending"
    if not all(state.succeeded for state in init):
        return "Pending"
    if main and all(state.state == "terminated" for state in main):
        if all(state.succeeded for state in main):
            return "Succeeded"
        # With OnFailure or Always a failed container would run again.
        return "Failed" if restart_policy == "Never" else "Running"
    if any(state.state in ("running", "terminated") for state in main):
        return "Running"
    return "Pending"


def pod_status(
    *,
    phase: str,
    init: list[ContainerState],
    main: list[ContainerState],
    conditions: Conditions,
    start_time: float,
    sandbox_ready: bool,
    reason: str = "",
    message: str = "",
) -> dict[str, Any]:
    """Return the status patch for a pod, updating `conditions` on the way."""
    terminal = phase in ("Succeeded", "Failed")
    conditions.set("PodScheduled", True)
    conditions.set("PodReadyToStartContainers", sandbox_ready and not terminal)

    unfinished_init = [state.name for state in init if not state.succeeded]
    if unfinished_init and not terminal:
        conditions.set(
            "Initialized",
            False,
            "ContainersNotInitialized",
            f"containers with incomplete status: [{' '.join(unfinished_init)}]",
        )
    else:
        conditions.set("Initialized", True)

    unready = [state.name for state in main if state.state != "running"]
    for kind in ("ContainersReady", "Ready"):
        if terminal:
            conditions.set(kind, False, "PodCompleted")
        elif unready:
            conditions.set(
                kind,
                False,
                "ContainersNotReady",
                f"containers with unready status: [{' '.join(unready)}]",
            )
        else:
            conditions.set(kind, True)

    status: dict[str, Any] = {
        "phase": phase,
        "hostIP": POD_IP,
        "hostIPs": [{"ip": POD_IP}],
        "podIP": POD_IP,
        "podIPs": [{"ip": POD_IP}],
        "startTime": api_time(start_time),
        "conditions": conditions.to_list(),
        "containerStatuses": [state.to_status() for state in main],
    }
    if init:
        status["initContainerStatuses"] = [state.to_status() for state in init]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status


def unschedulable_status(message: str) -> dict[str, Any]:
    """Return the status patch the scheduler writes for a pod it cannot place."""
    return {
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastProbeTime": None,
                "lastTransitionTime": api_time(),
            }
        ]
    }


def lost_pod_status(pod: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    """Return a Failed status for a pod whose processes are gone with no exit code.

    Containers that had not ended become terminated with reason
    `ContainerStatusUnknown` and exit code 137, as the real kubelet reports
    containers it can no longer find.
    """
    now = api_time()
    status = pod.get("status") or {}

    def ended(spec_key: str, status_key: str) -> list[dict[str, Any]]:
        known = {entry["name"]: entry for entry in status.get(status_key) or []}
        result = []
        for container in pod["spec"].get(spec_key) or []:
            entry = dict(
                known.get(container["name"])
                or {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "restartCount": 0,
                }
            )
            state = entry.get("state") or {}
            if "terminated" not in state:
                entry["state"] = {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "ContainerStatusUnknown",
                        "message": "The container could not be located when the pod was terminated",
                        "startedAt": (state.get("running") or {}).get("startedAt"),
                        "finishedAt": now,
                    }
                }
            entry["ready"] = False
            entry["started"] = False
            result.append(entry)
        return result

    conditions = [
        {
            "type": kind,
            "status": "False",
            "reason": "PodCompleted",
            "lastProbeTime": None,
            "lastTransitionTime": now,
        }
        for kind in ("ContainersReady", "Ready", "PodReadyToStartContainers")
    ]
    patch: dict[str, Any] = {
        "phase": "Failed",
        "reason": reason,
        "message": message,
        "conditions": conditions,
        "containerStatuses": ended("containers", "containerStatuses"),
    }
    if pod["spec"].get("initContainers"):
        patch["initContainerStatuses"] = ended("initContainers", "initContainerStatuses")
    return patch
