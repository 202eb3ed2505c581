"""The kubelet process: watches, scheduling, pod workers and restart recovery.

Three watches keep it informed, each filtered on the server: the pods bound
to its node, the pods bound to no node yet (which it schedules), and its own
Node object (whose labels and taints decide scheduling). Every pod on the node
gets a `PodWorker` thread; the kubelet only routes events to them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import urllib3

from .api import ApiError, KubeApi, pod_path
from .faults import FAULTS_FILE, Fault, FaultError, RuleCache, faults_for_pod
from .logs import follow_log
from .node import Heartbeat, node_resources, register_node
from .pump import OutputPump
from .runtime import PodRecord, PodWorker, process_start_ticks
from .scheduling import unschedulable_message
from .server import LogRequest, LogRequestError, LogServer, make_certificate
from .status import lost_pod_status, unschedulable_status

logger = logging.getLogger(__name__)

TERMINAL_PHASES = ("Succeeded", "Failed")
# Seconds a vanished pod may linger (held by a finalizer) before it is marked Failed.
VANISH_SETTLE_SECONDS = 5.0
RESTART_REASON = "KubeletRestarted"
RESTART_MESSAGE = (
    "The test bed kubelet restarted while this pod was running; its processes were "
    "stopped and their exit codes are lost."
)


def _uid(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["uid"])


def _label(obj: dict[str, Any]) -> str:
    return f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def _has_started(pod: dict[str, Any]) -> bool:
    """Whether a previous kubelet run started any container of the pod."""
    status = pod.get("status") or {}
    if status.get("phase") == "Running":
        return True
    entries = (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or [])
    return any({"running", "terminated"} & set(entry.get("state") or {}) for entry in entries)


class Kubelet:
    """One fake node; `start` brings it up, `stop` ends it."""

    def __init__(
        self,
        *,
        api: KubeApi,
        node_name: str,
        state_dir: Path,
        port: int,
        env_overrides: dict[str, str],
        schedule: bool = True,
        max_pods: int = 1000,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.state_dir = state_dir
        self.pods_dir = state_dir / "pods"
        self.port = port
        self.env_overrides = env_overrides
        self.base_path = os.environ.get("PATH", os.defpath)
        self.schedule = schedule
        self.allocatable = node_resources(max_pods)
        self.pump = OutputPump()

        self._fault_rules = RuleCache(state_dir / FAULTS_FILE)
        self._lock = threading.RLock()
        self._records: dict[str, PodRecord] = {}
        self._uid_by_name: dict[tuple[str, str], str] = {}
        self._workers: dict[str, PodWorker] = {}
        self._finished: set[str] = set()
        self._vanished: set[str] = set()
        # Pods whose deletion this kubelet confirmed already.
        self._confirmed: set[str] = set()
        self._fault_decisions: dict[str, list[Fault]] = {}
        self._unscheduled: dict[str, dict[str, Any]] = {}
        self._schedule_queue: queue.Queue[str] = queue.Queue()
        self._node: dict[str, Any] | None = None
        self._stopping = threading.Event()
        self._synced: dict[str, threading.Event] = {}
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="api-call")
        self._server: LogServer | None = None
        self._heartbeat: Heartbeat | None = None

    @property
    def ready_file(self) -> Path:
        return self.state_dir / "ready"

    # -- start and stop ----------------------------------------------------------

    def start(self, *, sync_timeout: float = 60.0) -> None:
        """Register the node, start every thread, and write the ready file."""
        self.ready_file.unlink(missing_ok=True)
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.pump.start()

        cert, key = make_certificate(self.state_dir / "tls", self.node_name)
        self._server = LogServer(self.port, cert, key, self.serve_log)
        self.port = self._server.port
        threading.Thread(target=self._server.serve_forever, name="log-server", daemon=True).start()

        self._node = register_node(self.api, self.node_name, self.port, self.allocatable)
        self._heartbeat = Heartbeat(self.api, self.node_name, self.port, self.allocatable)
        self._heartbeat.beat(with_status=False)
        self._heartbeat.start()

        self._recover()

        node_query = {"fieldSelector": f"spec.nodeName={self.node_name}"}
        self._start_watch(
            "node pods", "/api/v1/pods", node_query, self._on_node_pod, self._sync_node_pods
        )
        self._start_watch(
            "node",
            "/api/v1/nodes",
            {"fieldSelector": f"metadata.name={self.node_name}"},
            self._on_node,
            self._sync_node,
        )
        if self.schedule:
            pending_query = {
                "fieldSelector": "spec.nodeName=,status.phase!=Succeeded,status.phase!=Failed"
            }
            self._start_watch(
                "unscheduled pods",
                "/api/v1/pods",
                pending_query,
                self._on_unscheduled,
                self._sync_unscheduled,
            )
            threading.Thread(target=self._schedule_loop, name="scheduler", daemon=True).start()

        for name, synced in self._synced.items():
            if not synced.wait(sync_timeout):
                raise RuntimeError(
                    f"the watch of {name} did not list its objects within {sync_timeout:.0f} s"
                )
        self.ready_file.write_text(
            json.dumps({"pid": os.getpid(), "node": self.node_name, "port": self.port}) + "\n"
        )
        logger.info(
            "The kubelet of node %s is ready; it serves logs on https://127.0.0.1:%d and %s.",
            self.node_name,
            self.port,
            "schedules unbound pods" if self.schedule else "leaves scheduling to others",
        )

    def stop(self) -> None:
        """Stop every container process and the servers; pod statuses stay as they are."""
        self._stopping.set()
        self.ready_file.unlink(missing_ok=True)
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.request_stop("shutdown")
        for worker in workers:
            worker.join(timeout=15)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._server is not None:
            self._server.shutdown()
        logger.info(
            "The kubelet of node %s stopped; it stopped %d pod(s).", self.node_name, len(workers)
        )

    # -- restart recovery --------------------------------------------------------

    def _recover(self) -> None:
        """Stop processes a previous run left, and fail the pods it was running."""
        pods = self.api.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.node_name}")[
            "items"
        ]
        live = {_uid(pod) for pod in pods}
        for folder in self.pods_dir.iterdir():
            self._kill_leftovers(folder)
            if folder.name.rsplit("_", 1)[-1] not in live:
                shutil.rmtree(folder, ignore_errors=True)

        for pod in pods:
            phase = (pod.get("status") or {}).get("phase")
            if phase in TERMINAL_PHASES or pod["metadata"].get("deletionTimestamp"):
                continue
            if _has_started(pod):
                self.api.patch(
                    pod_path(pod["metadata"]["namespace"], pod["metadata"]["name"], "status"),
                    {"status": lost_pod_status(pod, RESTART_REASON, RESTART_MESSAGE)},
                )
                self._finished.add(_uid(pod))
                logger.warning(
                    "Pod %s was running when the kubelet restarted; it is marked Failed.",
                    _label(pod),
                )

    def _kill_leftovers(self, folder: Path) -> None:
        try:
            entries = json.loads((folder / "processes.json").read_text())
        except (OSError, ValueError):
            return
        for container, entry in entries.items():
            pid = int(entry["pid"])
            # A process id may have been reused: only the same process is killed.
            if entry.get("start_ticks") is None or process_start_ticks(pid) != entry["start_ticks"]:
                continue
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
            logger.warning(
                "Killed process %d of container %s (pod folder %s), left running by the previous kubelet.",
                pid,
                container,
                folder.name,
            )

    # -- watches -----------------------------------------------------------------

    def _start_watch(
        self,
        name: str,
        path: str,
        query: dict[str, str],
        on_event: Callable[[str, dict[str, Any]], None],
        on_sync: Callable[[list[dict[str, Any]]], Any],
    ) -> None:
        synced = self._synced[name] = threading.Event()
        thread = threading.Thread(
            target=self._watch_loop,
            args=(name, path, query, on_event, on_sync, synced),
            name=f"watch-{name}",
            daemon=True,
        )
        thread.start()

    def _watch_loop(
        self,
        name: str,
        path: str,
        query: dict[str, str],
        on_event: Callable[[str, dict[str, Any]], None],
        on_sync: Callable[[list[dict[str, Any]]], Any],
        synced: threading.Event,
    ) -> None:
        """List, then watch from the list's version; list again when the version expires."""
        version: str | None = None
        failures = 0
        while not self._stopping.is_set():
            try:
                if version is None:
                    listing = self.api.get(path, **query)
                    version = listing["metadata"]["resourceVersion"]
                    on_sync(listing["items"])
                    synced.set()
                for event in self.api.watch(
                    path, query={**query, "resourceVersion": version, "allowWatchBookmarks": "true"}
                ):
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        # 410 Gone: the version is too old, so list again.
                        if obj.get("code") != 410:
                            logger.warning(
                                "The watch of %s returned an error: %s", name, obj.get("message")
                            )
                        version = None
                        break
                    version = obj["metadata"]["resourceVersion"]
                    if kind != "BOOKMARK":
                        on_event(kind, obj)
                if failures:
                    logger.info("The watch of %s works again after %d failure(s).", name, failures)
                failures = 0
            except ApiError as error:
                failures += 1
                if error.status == 410:
                    version = None
                    continue
                self._watch_failed(name, failures, error)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
                failures += 1
                self._watch_failed(name, failures, error)
            except Exception:
                failures += 1
                logger.exception(
                    "Handling an event of the watch of %s failed; the kubelet lists again.", name
                )
                version = None
                self._stopping.wait(1.0)

    def _watch_failed(self, name: str, failures: int, error: Exception) -> None:
        if failures == 1 or failures % 10 == 0:
            logger.warning(
                "The watch of %s failed (%d time(s) in a row), retrying: %s", name, failures, error
            )
        self._stopping.wait(min(failures, 10))

    # -- pods on this node -------------------------------------------------------

    def _sync_node_pods(self, pods: list[dict[str, Any]]) -> None:
        present = {_uid(pod) for pod in pods}
        for pod in pods:
            self._on_node_pod("ADDED", pod)
        with self._lock:
            missing = [uid for uid in self._records if uid not in present]
        for uid in missing:
            self._forget(uid)

    def _on_node_pod(self, kind: str, pod: dict[str, Any]) -> None:
        uid = _uid(pod)
        if kind == "DELETED":
            self._forget(uid)
            return

        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        with self._lock:
            record = self._record(pod)
            worker = self._workers.get(uid)
            if worker is not None:
                worker.record.pod = pod
                if deleting:
                    worker.request_stop("deleted")
                return
            if uid in self._finished or (pod.get("status") or {}).get("phase") in TERMINAL_PHASES:
                self._finished.add(uid)
                if deleting and uid not in self._vanished and uid not in self._confirmed:
                    self._confirmed.add(uid)
                    self._executor.submit(self.delete_pod, pod)
                return

            record.faults = self._decide_faults(pod)
            self._save_faults(record)
            worker = PodWorker(self, record)
            self._workers[uid] = worker
            if deleting:
                worker.request_stop("deleted")
        worker.start()

    def _record(self, pod: dict[str, Any]) -> PodRecord:
        uid = _uid(pod)
        record = self._records.get(uid)
        if record is None:
            namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
            record = PodRecord(
                uid=uid,
                namespace=namespace,
                name=name,
                folder=self.pods_dir / f"{namespace}_{name}_{uid}",
                pod=pod,
            )
            record.folder.mkdir(parents=True, exist_ok=True)
            record.faults = self._load_faults(record.folder)
            self._records[uid] = record
            self._uid_by_name[(namespace, name)] = uid
        record.pod = pod
        return record

    def _forget(self, uid: str) -> None:
        """Drop a pod that left the API server; its worker cleans up when it ends."""
        with self._lock:
            worker = self._workers.get(uid)
            if worker is not None:
                worker.record.gone = True
                worker.request_stop("gone")
                return
            record = self._records.pop(uid, None)
            self._finished.discard(uid)
            self._vanished.discard(uid)
            self._confirmed.discard(uid)
            self._fault_decisions.pop(uid, None)
            if record is None:
                return
            if self._uid_by_name.get((record.namespace, record.name)) == uid:
                del self._uid_by_name[(record.namespace, record.name)]
        shutil.rmtree(record.folder, ignore_errors=True)

    def worker_done(self, worker: PodWorker) -> None:
        """Called by a worker thread as its last step."""
        uid = worker.record.uid
        with self._lock:
            self._workers.pop(uid, None)
            if worker.stop_reason == "shutdown":
                return
            self._finished.add(uid)
        if worker.record.gone:
            self._forget(uid)

    def delete_pod(self, pod: dict[str, Any], *, vanished: bool = False) -> None:
        """Delete a pod with grace period 0, as a kubelet confirms a deletion."""
        uid = _uid(pod)
        with self._lock:
            self._confirmed.add(uid)
            if vanished:
                self._vanished.add(uid)
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid},
        }
        for attempt in range(5):
            try:
                self.api.delete(
                    pod_path(pod["metadata"]["namespace"], pod["metadata"]["name"]), body
                )
            except ApiError as error:
                if error.status not in (404, 409):
                    logger.warning("Deleting pod %s failed: %s", _label(pod), error)
                    time.sleep(2**attempt)
                    continue
            except (urllib3.exceptions.HTTPError, OSError) as error:
                logger.warning("Deleting pod %s failed: %s", _label(pod), error)
                time.sleep(2**attempt)
                continue
            logger.info("Deleted pod %s with grace period 0.", _label(pod))
            break
        if vanished:
            timer = threading.Timer(VANISH_SETTLE_SECONDS, self._settle_vanished, args=(pod,))
            timer.daemon = True
            timer.start()

    def _settle_vanished(self, pod: dict[str, Any]) -> None:
        """Mark a vanished pod Failed if a finalizer still keeps it, as PodGC would."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        try:
            current = self.api.get(pod_path(namespace, name))
            if (
                _uid(current) != _uid(pod)
                or (current.get("status") or {}).get("phase") in TERMINAL_PHASES
            ):
                return
            message = "The pod vanished from its node (test bed fault vanish)."
            self.api.patch(
                pod_path(namespace, name, "status"),
                {"status": lost_pod_status(current, "Vanished", message)},
            )
            logger.info(
                "Vanished pod %s/%s is still held by a finalizer; it is marked Failed.",
                namespace,
                name,
            )
        except ApiError as error:
            if error.status != 404:
                logger.warning("Checking vanished pod %s/%s failed: %s", namespace, name, error)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            logger.warning("Checking vanished pod %s/%s failed: %s", namespace, name, error)

    # -- faults ------------------------------------------------------------------

    def _decide_faults(self, pod: dict[str, Any]) -> list[Fault]:
        """Return a pod's faults, decided once when the kubelet first receives the pod."""
        uid = _uid(pod)
        with self._lock:
            if uid in self._fault_decisions:
                return self._fault_decisions[uid]
            try:
                faults = faults_for_pod(pod, self._fault_rules.rules())
            except FaultError as error:
                logger.error(
                    "The faults of pod %s are invalid, so it gets none: %s", _label(pod), error
                )
                faults = []
            if faults:
                described = ", ".join(
                    f.kind if f.seconds is None else f"{f.kind} {f.seconds:g}" for f in faults
                )
                logger.info("Pod %s gets fault(s): %s.", _label(pod), described)
            self._fault_decisions[uid] = faults
            return faults

    def _save_faults(self, record: PodRecord) -> None:
        data = [{"kind": fault.kind, "seconds": fault.seconds} for fault in record.faults]
        (record.folder / "faults.json").write_text(json.dumps(data))

    @staticmethod
    def _load_faults(folder: Path) -> list[Fault]:
        try:
            data = json.loads((folder / "faults.json").read_text())
        except (OSError, ValueError):
            return []
        return [Fault(item["kind"], item.get("seconds")) for item in data]

    # -- scheduling --------------------------------------------------------------

    def _sync_unscheduled(self, pods: list[dict[str, Any]]) -> None:
        with self._lock:
            self._unscheduled = {_uid(pod): pod for pod in pods}
        for pod in pods:
            self._schedule_queue.put(_uid(pod))

    def _on_unscheduled(self, kind: str, pod: dict[str, Any]) -> None:
        uid = _uid(pod)
        with self._lock:
            if kind == "DELETED":
                # Bound (it left the selection) or deleted.
                self._unscheduled.pop(uid, None)
                return
            self._unscheduled[uid] = pod
        self._schedule_queue.put(uid)

    def _sync_node(self, nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            self._on_node("ADDED", node)

    def _on_node(self, kind: str, node: dict[str, Any]) -> None:
        if kind == "DELETED":
            logger.warning("Node %s was deleted; the kubelet registers it again.", self.node_name)
            self._executor.submit(
                register_node, self.api, self.node_name, self.port, self.allocatable
            )
            return
        with self._lock:
            previous = self._node
            self._node = node

            def placement(item: dict[str, Any] | None) -> Any:
                if item is None:
                    return None
                return (
                    item["metadata"].get("labels"),
                    item.get("spec", {}).get("taints"),
                    item.get("spec", {}).get("unschedulable"),
                )

            # Labels, taints or cordoning changed: pending pods may fit now.
            if placement(previous) != placement(node):
                for uid in self._unscheduled:
                    self._schedule_queue.put(uid)

    def _schedule_loop(self) -> None:
        while not self._stopping.is_set():
            uid = self._schedule_queue.get()
            with self._lock:
                pod = self._unscheduled.get(uid)
                node = self._node
            if pod is None or node is None:
                continue
            try:
                self._schedule(pod, node)
            except (ApiError, urllib3.exceptions.HTTPError, OSError) as error:
                logger.warning("Scheduling pod %s failed, retrying in 2 s: %s", _label(pod), error)
                timer = threading.Timer(2.0, self._schedule_queue.put, args=(uid,))
                timer.daemon = True
                timer.start()

    def _schedule(self, pod: dict[str, Any], node: dict[str, Any]) -> None:
        """Bind a pod to this node, or record on the pod why it cannot run here."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        if pod["spec"].get("schedulerName", "default-scheduler") != "default-scheduler":
            return
        if pod["metadata"].get("deletionTimestamp"):
            return

        faults = self._decide_faults(pod)
        message: str | None
        if any(fault.kind == "unschedulable" for fault in faults):
            message = (
                "0/1 nodes are available: 1 node(s) were unavailable "
                f"(test bed fault unschedulable keeps pod {namespace}/{name} "
                f"off node {self.node_name})."
            )
        else:
            message = unschedulable_message(pod, node)

        if message is not None:
            conditions: list[dict[str, Any]] = (pod.get("status") or {}).get("conditions") or []
            current = next((c for c in conditions if c.get("type") == "PodScheduled"), {})
            seen = (current.get("status"), current.get("reason"), current.get("message"))
            if seen == ("False", "Unschedulable", message):
                return
            self.api.patch(
                pod_path(namespace, name, "status"), {"status": unschedulable_status(message)}
            )
            logger.info("Pod %s/%s cannot be scheduled: %s", namespace, name, message)
            return

        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace, "uid": _uid(pod)},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self.api.create(pod_path(namespace, name, "binding"), binding)
        except ApiError as error:
            # 409: bound meanwhile; 404: deleted meanwhile. Both end this pod's scheduling.
            if error.status in (404, 409):
                return
            raise
        logger.info("Bound pod %s/%s to node %s.", namespace, name, self.node_name)

    # -- logs --------------------------------------------------------------------

    def serve_log(self, request: LogRequest, stopped: threading.Event) -> Iterator[bytes]:
        """Return the chunks of a container log, or raise LogRequestError."""
        with self._lock:
            uid = self._uid_by_name.get((request.namespace, request.pod))
            record = self._records.get(uid) if uid else None
        if record is None:
            raise LogRequestError(
                404,
                f'pod "{request.pod}" in namespace "{request.namespace}" is not on node {self.node_name}',
            )

        spec = record.pod["spec"]
        containers = [c["name"] for c in (spec.get("initContainers") or []) + spec["containers"]]
        if request.container not in containers:
            raise LogRequestError(
                400,
                f'container "{request.container}" is not valid for pod "{request.pod}"; choose one of: {", ".join(containers)}',
            )

        attempts = record.attempts(request.container)
        if request.previous:
            if len(attempts) < 2:
                raise LogRequestError(
                    400,
                    f'previous terminated container "{request.container}" in pod "{request.pod}" not found',
                )
            path, live = record.log_path(request.container, attempts[-2]), None
        else:
            if not attempts:
                raise LogRequestError(
                    400,
                    f'container "{request.container}" in pod "{request.pod}" is waiting to start: '
                    f"{self._waiting_reason(record.pod, request.container)}",
                )
            path = record.log_path(request.container, attempts[-1])
            live = record.live_logs.get(request.container)
            if live is not None and live.path != path:
                live = None
        return follow_log(
            path, live, request.options, truncate=record.has_fault("truncate-log"), stopped=stopped
        )

    @staticmethod
    def _waiting_reason(pod: dict[str, Any], container: str) -> str:
        status = pod.get("status") or {}
        for entry in (status.get("containerStatuses") or []) + (
            status.get("initContainerStatuses") or []
        ):
            if entry.get("name") == container:
                return str(
                    ((entry.get("state") or {}).get("waiting") or {}).get("reason")
                    or "ContainerCreating"
                )
        return "ContainerCreating"
