"""The test bed's Kubernetes API as the benchmarks use it: namespaces, Scans, Jobs and watches.

Watches run in threads and stamp every event with `time.perf_counter()` on
receipt, because Kubernetes timestamps (creationTimestamp, completionTime)
have a resolution of one second, far coarser than the latencies measured.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from bench.context import say

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = REPO_ROOT / "crds" / "scans.secapi.io.yaml"
GROUP = "secapi.io"
VERSION = "v1alpha1"
PLURAL = "scans"
# Label of every namespace the benchmarks create.
BENCH_LABEL = "secapi.io/bench"
# Seconds to wait for the benchmark namespaces to be deleted before a part starts.
NAMESPACE_DELETE_SECONDS = 900


class Cluster:
    """Clients of the bed's API server, built from its admin kubeconfig."""

    def __init__(self, kubeconfig: Path) -> None:
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.extensions = client.ApiextensionsV1Api(self.api_client)

    def close(self) -> None:
        self.api_client.close()

    def ensure_crd(self, *, timeout: float = 60.0) -> None:
        """Create the Scan CRD unless it exists, and wait until it is Established."""
        manifest = yaml.safe_load(CRD_FILE.read_text())
        name = manifest["metadata"]["name"]
        try:
            self.extensions.read_custom_resource_definition(name)
        except ApiException as error:
            if error.status != 404:
                raise
            self.extensions.create_custom_resource_definition(manifest)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            crd = self.extensions.read_custom_resource_definition(name)
            conditions = (crd.status and crd.status.conditions) or []
            if any(item.type == "Established" and item.status == "True" for item in conditions):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the CRD {name} was not Established within {timeout:g} s")

    @contextmanager
    def namespace(self, prefix: str) -> Iterator[str]:
        """Create a namespace named `prefix-<random>`, yield its name, delete it at the end.

        The exit waits until the namespace is gone. Deleting the thousands of Scans
        that the API part creates keeps kube-apiserver and etcd busy for up to a few minutes,
        and a part that ran meanwhile measured that load: GET p99 latencies of
        150-280 ms instead of 65-100 ms.
        """
        self.wait_for_bench_namespaces_gone()
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace({"metadata": {"name": name, "labels": {BENCH_LABEL: "true"}}})
        try:
            yield name
        finally:
            try:
                self.core.delete_namespace(name, propagation_policy="Background")
            except ApiException as error:
                if error.status != 404:
                    raise
            self.wait_for_bench_namespaces_gone()

    def wait_for_bench_namespaces_gone(self, *, timeout: float = NAMESPACE_DELETE_SECONDS) -> None:
        """Wait until no namespace of an earlier benchmark run is left, terminating or not.

        Raises TimeoutError naming the namespaces left after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while True:
            left = [
                item.metadata.name
                for item in self.core.list_namespace(label_selector=BENCH_LABEL).items
            ]
            if not left:
                break
            for name in left:
                if not self._terminating(name):
                    self.core.delete_namespace(name, propagation_policy="Background")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"benchmark namespaces {', '.join(left)} were still being deleted after "
                    f"{timeout:g} s; wait for `kubectl get namespaces` to drop them, then rerun"
                )
            time.sleep(1)
        waited = time.monotonic() - started
        if waited >= 1:
            say(f"waited {waited:.0f} s for the benchmark namespaces to be deleted")

    def _terminating(self, name: str) -> bool:
        try:
            namespace = self.core.read_namespace(name)
        except ApiException as error:
            if error.status == 404:
                return True
            raise
        return namespace.metadata.deletion_timestamp is not None

    def create_scan(self, namespace: str, name: str, image: str) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Scan",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"image": image},
        }
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body
        )
        return result

    def list_scans(self, namespace: str) -> list[dict[str, Any]]:
        result = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return list(result["items"])


@dataclass(frozen=True)
class Event:
    received_at: float
    type: str
    name: str
    obj: dict[str, Any]


class Watcher:
    """Collect the watch events of one kind of object in a namespace, in a thread."""

    def __init__(self, cluster: Cluster, namespace: str, kind: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.kind = kind
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopped = threading.Event()
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)
        self._ready = threading.Event()

    def _list_call(self) -> tuple[Any, tuple[Any, ...]]:
        if self.kind == "scans":
            method: Any = self.cluster.custom.list_namespaced_custom_object
            args: tuple[Any, ...] = (GROUP, VERSION, self.namespace, PLURAL)
        elif self.kind == "jobs":
            method, args = self.cluster.batch.list_namespaced_job, (self.namespace,)
        elif self.kind == "pods":
            method, args = self.cluster.core.list_namespaced_pod, (self.namespace,)
        else:
            raise ValueError(f"cannot watch {self.kind!r}; choose scans, jobs or pods")

        # A wrapper without a docstring or return annotation: the watch then
        # yields plain dicts instead of building client model objects per event.
        def call(*positional: Any, **keywords: Any) -> Any:
            return method(*positional, **keywords)

        return call, args

    def start(self) -> Watcher:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError(f"the watch of {self.kind} in {self.namespace} did not start")
        return self

    def _run(self) -> None:
        call, args = self._list_call()
        resource_version = None
        while not self._stopped.is_set():
            try:
                if resource_version is None:
                    listing = call(*args, _preload_content=False)
                    data = json.loads(listing.data)
                    resource_version = data["metadata"]["resourceVersion"]
                    self._ready.set()
                stream = self._watch.stream(
                    call,
                    *args,
                    resource_version=resource_version,
                    timeout_seconds=60,
                    allow_watch_bookmarks=True,
                )
                for raw in stream:
                    received_at = time.perf_counter()
                    obj = raw["raw_object"]
                    resource_version = obj.get("metadata", {}).get(
                        "resourceVersion", resource_version
                    )
                    if raw["type"] == "BOOKMARK":
                        continue
                    if raw["type"] == "ERROR":
                        # Usually 410 Gone: the resource version expired; list again.
                        resource_version = None
                        break
                    event = Event(received_at, raw["type"], obj["metadata"]["name"], obj)
                    with self._changed:
                        self.events.append(event)
                        self._changed.notify_all()
                    if self._stopped.is_set():
                        break
            except ApiException as error:
                if error.status == 410:
                    resource_version = None
                    continue
                if self._stopped.is_set():
                    return
                raise
            except Exception:
                if self._stopped.is_set():
                    return
                raise

    def wait_for(self, predicate: Any, *, timeout: float) -> Event:
        """Wait for the first event (past or future) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching {self.kind} event within {timeout:g} s")
                self._changed.wait(remaining)

    def wait_new(self, seen: int, *, timeout: float) -> list[Event]:
        """Return the events after the first `seen` ones, waiting up to `timeout` for one."""
        with self._changed:
            if len(self.events) <= seen:
                self._changed.wait(timeout)
            return self.events[seen:]

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)
