"""Tests that the fake kubelet plays a node faithfully against the real API server.

Most tests use the bed's own kubelet: they create pods and Jobs through
kube-apiserver, let kube-controller-manager's Job controller react, and read
logs through the API server's log endpoint with the Python client and with
`kubectl logs`. Tests of restarts, of the env file and of idle CPU start a
second kubelet of their own that runs only the pods bound to its node. The
first group checks the pure parts (path rewriting, scheduling filters, fault
parsing, log rendering) without a cluster.
"""

from __future__ import annotations

import base64
import calendar
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from kubernetes import client, config

from tests.testbed.bed import Testbed
from tests.testbed.kubelet import faults
from tests.testbed.kubelet.api import ApiError, KubeApi, pod_path
from tests.testbed.kubelet.containers import MountRewriter, expand_references
from tests.testbed.kubelet.logs import LogOptions, Record, render
from tests.testbed.kubelet.scheduling import unschedulable_message
from tests.testbed.paths import REPO_ROOT

T = TypeVar("T")

TIMESTAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


# --- pure parts, no cluster ---------------------------------------------------


class TestPureParts:
    def test_rewriter_matches_whole_paths(self) -> None:
        rewriter = MountRewriter(
            {"/secrets": Path("/s"), "/secrets/docker": Path("/d"), "/tmp": Path("/t")}
        )

        assert rewriter.rewrite("/secrets/docker/config.json") == "/d/config.json"
        assert rewriter.rewrite("--dir=/secrets/x /tmp") == "--dir=/s/x /t"
        assert rewriter.rewrite("/tmpfs /x/tmp /secrets-old") == "/tmpfs /x/tmp /secrets-old"
        assert rewriter.rewrite('"/tmp"') == '"/t"'

    def test_references_expand_like_kubernetes(self) -> None:
        variables = {"A": "one", "B": "two"}

        assert expand_references("$(A)-$(B)", variables) == "one-two"
        assert expand_references("$$(A)", variables) == "$(A)"
        assert expand_references("$(MISSING) $A", variables) == "$(MISSING) $A"

    def test_annotation_parsing_and_precedence(self) -> None:
        pod = {
            "metadata": {
                "namespace": "ns",
                "labels": {"app": "x"},
                "annotations": {faults.ANNOTATION: "hang, delay-start 2"},
            }
        }
        rules = [
            faults.FaultRule(namespace="ns", labels={"app": "x"}, fault=faults.Fault("oom", 1))
        ]

        found = faults.faults_for_pod(pod, rules)

        # oom outranks hang, and delay-start combines with either.
        assert faults.Fault("oom", 1) in found
        assert faults.Fault("delay-start", 2) in found
        assert all(fault.kind != "hang" for fault in found)
        with pytest.raises(faults.FaultError, match="invalid seconds 'soon'"):
            faults.parse_annotation("oom soon")

    def test_scheduling_filters(self) -> None:
        node = {
            "metadata": {"name": "n1", "labels": {"zone": "a", "cores": "8"}},
            "spec": {"taints": [{"key": "gpu", "value": "yes", "effect": "NoSchedule"}]},
        }
        tolerate_all = {"tolerations": [{"operator": "Exists"}]}

        def pod(**spec: Any) -> dict[str, Any]:
            return {"spec": {**tolerate_all, **spec}}

        def affinity(*expressions: dict[str, Any]) -> dict[str, Any]:
            term = {"matchExpressions": list(expressions)}
            required = {"nodeSelectorTerms": [term]}
            return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}

        assert unschedulable_message(pod(), node) is None
        assert "untolerated taint {gpu=yes:NoSchedule}" in (
            unschedulable_message({"spec": {}}, node) or ""
        )
        gt = affinity({"key": "cores", "operator": "Gt", "values": ["4"]})
        assert unschedulable_message(pod(affinity=gt), node) is None
        lt = affinity({"key": "cores", "operator": "Lt", "values": ["4"]})
        assert unschedulable_message(pod(affinity=lt), node) is not None
        absent = affinity({"key": "zone", "operator": "DoesNotExist"})
        assert unschedulable_message(pod(affinity=absent), node) is not None
        assert unschedulable_message(pod(nodeSelector={"zone": "b"}), node) is not None

    def test_render_joins_partial_lines(self) -> None:
        records = [
            Record(b"t1", "stdout", False, b"hel"),
            Record(b"t2", "stderr", True, b"warning"),
            Record(b"t3", "stdout", True, b"lo"),
            Record(b"t4", "stdout", True, b"end"),
        ]

        assert render(records, LogOptions()) == b"hello\nwarning\nend\n"
        assert render(records, LogOptions(tail_lines=2)) == b"warning\nend\n"
        assert render(records, LogOptions(timestamps=True, tail_lines=1)) == b"t4 end\n"
        assert render(records, LogOptions(stream="Stderr")) == b"warning\n"
        # A line counts from the time of its first part.
        assert render(records, LogOptions(since="t2")) == b"warning\nend\n"
        assert render(records, LogOptions(limit_bytes=4)) == b"hell"
        # 18 bytes in all, so the first 9 stay.
        assert render(records, LogOptions(), truncate=True) == b"hello\nwar"


# --- fixtures and helpers ----------------------------------------------------


@pytest.fixture(scope="module")
def kube(testbed: Testbed, kubeconfig: Path) -> KubeApi:
    return KubeApi(kubeconfig)


@pytest.fixture(scope="module")
def core(testbed: Testbed, kubeconfig: Path) -> Iterator[client.CoreV1Api]:
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield client.CoreV1Api(api_client)
    finally:
        api_client.close()


@pytest.fixture(scope="module")
def kubelet_state(testbed: Testbed) -> Path:
    return testbed.paths.kubelet_state


@pytest.fixture(scope="module")
def node_name(kubelet_state: Path) -> str:
    return str(json.loads((kubelet_state / "ready").read_text())["node"])


@pytest.fixture(scope="module")
def namespace(kube: KubeApi, kubelet_state: Path) -> Iterator[str]:
    name = f"kubelet-test-{uuid.uuid4().hex[:8]}"
    kube.create("/api/v1/namespaces", {"metadata": {"name": name}})
    try:
        yield name
    finally:
        faults.clear_faults(namespace=name, state_dir=kubelet_state)
        kube.delete(f"/api/v1/namespaces/{name}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def shell(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def pod_manifest(
    name: str,
    command: list[str],
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    container: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "main",
                    "image": "example.test/tool:1",
                    "command": command,
                    **(container or {}),
                }
            ],
            **(spec or {}),
        },
    }


def create_pod(kube: KubeApi, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    return kube.create(f"/api/v1/namespaces/{namespace}/pods", manifest)


def get_pod(kube: KubeApi, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return kube.get(pod_path(namespace, name))
    except ApiError as error:
        if error.status == 404:
            return None
        raise


def wait_for(check: Callable[[], T | None], *, what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def wait_for_phase(
    kube: KubeApi, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 60.0
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        pod = get_pod(kube, namespace, name)
        return pod if pod and pod.get("status", {}).get("phase") in phases else None

    return wait_for(
        check, what=f"pod {namespace}/{name} to reach {' or '.join(phases)}", timeout=timeout
    )


def wait_for_gone(kube: KubeApi, namespace: str, name: str, timeout: float = 30.0) -> None:
    wait_for(
        lambda: get_pod(kube, namespace, name) is None,
        what=f"pod {namespace}/{name} to disappear",
        timeout=timeout,
    )


def container_state(pod: dict[str, Any], kind: str, index: int = 0) -> dict[str, Any]:
    """Return the `running`, `waiting` or `terminated` part of a container status, or {}."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    if len(statuses) <= index:
        return {}
    return dict(statuses[index].get("state", {}).get(kind) or {})


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in pod.get("status", {}).get("conditions") or []:
        if item["type"] == kind:
            return dict(item)
    return {}


def pod_log(core: client.CoreV1Api, namespace: str, name: str, **options: Any) -> str:
    return str(core.read_namespaced_pod_log(name, namespace, **options))


def process_ids(state_dir: Path, namespace: str, name: str) -> list[int]:
    folders = list((state_dir / "pods").glob(f"{namespace}_{name}_*"))
    assert len(folders) == 1, f"expected one state folder of pod {name}, found {folders}"
    entries = json.loads((folders[0] / "processes.json").read_text())
    return [int(entry["pid"]) for entry in entries.values()]


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def delete_pod(kube: KubeApi, namespace: str, name: str) -> None:
    try:
        kube.delete(pod_path(namespace, name))
    except ApiError as error:
        if error.status != 404:
            raise


# --- the node ---------------------------------------------------------------


@pytest.mark.cluster
class TestNode:
    def test_node_registered_ready(
        self, kube: KubeApi, node_name: str, kubelet_state: Path
    ) -> None:
        node = kube.get(f"/api/v1/nodes/{node_name}")
        status = node["status"]
        port = json.loads((kubelet_state / "ready").read_text())["port"]

        assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]
        assert status["daemonEndpoints"]["kubeletEndpoint"]["Port"] == port
        assert {"cpu", "memory", "pods"} <= set(status["capacity"])
        assert {"cpu", "memory", "pods"} <= set(status["allocatable"])
        labels = node["metadata"]["labels"]
        assert labels["kubernetes.io/hostname"] == node_name
        assert labels["kubernetes.io/os"] == "linux"
        assert labels["kubernetes.io/arch"] in ("amd64", "arm64")
        assert condition(node, "Ready")["status"] == "True"

    def test_lease_renewed(self, kube: KubeApi, node_name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node_name}"
        first = kube.get(path)["spec"]["renewTime"]
        # The lease is renewed every 10 seconds.
        second = wait_for(
            lambda: (renewed := kube.get(path)["spec"]["renewTime"]) != first and renewed,
            what="the node lease to be renewed",
            timeout=25,
        )
        assert second > first
        assert kube.get(path)["spec"]["holderIdentity"] == node_name


# --- pods -------------------------------------------------------------------


@pytest.mark.cluster
class TestPodLifecycle:
    def test_pod_succeeds_with_terminated_status(
        self, kube: KubeApi, namespace: str, node_name: str
    ) -> None:
        name = unique("ok")
        create_pod(kube, namespace, pod_manifest(name, shell("echo hello")))

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        assert pod["status"]["phase"] == "Succeeded"
        assert pod["spec"]["nodeName"] == node_name
        assert pod["status"]["hostIP"] == "127.0.0.1"
        terminated = container_state(pod, "terminated")
        assert terminated["exitCode"] == 0
        assert terminated["reason"] == "Completed"
        assert terminated["startedAt"] <= terminated["finishedAt"]
        assert pod["status"]["containerStatuses"][0]["ready"] is False
        assert condition(pod, "PodScheduled")["status"] == "True"
        assert condition(pod, "Ready")["reason"] == "PodCompleted"

    def test_pod_fails_with_real_exit_code(self, kube: KubeApi, namespace: str) -> None:
        name = unique("fail")
        create_pod(kube, namespace, pod_manifest(name, shell("exit 3")))

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        assert pod["status"]["phase"] == "Failed"
        terminated = container_state(pod, "terminated")
        assert terminated["exitCode"] == 3
        assert terminated["reason"] == "Error"

    def test_running_pod_stops_on_deletion(
        self, kube: KubeApi, namespace: str, kubelet_state: Path
    ) -> None:
        name = unique("sleeper")
        create_pod(kube, namespace, pod_manifest(name, ["sleep", "300"]))

        pod = wait_for_phase(kube, namespace, name, ("Running",))
        assert container_state(pod, "running")["startedAt"]
        assert pod["status"]["containerStatuses"][0]["ready"] is True
        assert condition(pod, "Ready")["status"] == "True"
        (pid,) = process_ids(kubelet_state, namespace, name)
        assert process_alive(pid)

        # A graceful deletion only ends when the kubelet confirms it.
        kube.delete(pod_path(namespace, name))
        wait_for_gone(kube, namespace, name)
        wait_for(lambda: not process_alive(pid), what=f"process {pid} to end", timeout=10)

    def test_unknown_executable_is_start_error(self, kube: KubeApi, namespace: str) -> None:
        name = unique("noexec")
        create_pod(kube, namespace, pod_manifest(name, ["secapi-no-such-program"]))

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        terminated = container_state(pod, "terminated")
        assert pod["status"]["phase"] == "Failed"
        assert terminated["reason"] == "StartError"
        assert terminated["exitCode"] == 128
        assert "secapi-no-such-program" in terminated["message"]

    def test_on_failure_restarts_container(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str
    ) -> None:
        name = unique("retry")
        script = (
            "if [ -f /data/once ]; then echo second; exit 0; fi; "
            "touch /data/once; echo first; exit 1"
        )
        manifest = pod_manifest(
            name,
            shell(script),
            container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            spec={"restartPolicy": "OnFailure", "volumes": [{"name": "data", "emptyDir": {}}]},
        )
        create_pod(kube, namespace, manifest)

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        status = pod["status"]["containerStatuses"][0]
        assert pod["status"]["phase"] == "Succeeded"
        assert status["restartCount"] == 1
        assert status["lastState"]["terminated"]["exitCode"] == 1
        assert pod_log(core, namespace, name) == "second\n"
        assert pod_log(core, namespace, name, previous=True) == "first\n"

    def test_pod_deadline_fails_pod(self, kube: KubeApi, namespace: str) -> None:
        name = unique("deadline")
        create_pod(
            kube, namespace, pod_manifest(name, ["sleep", "300"], spec={"activeDeadlineSeconds": 2})
        )

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"), timeout=30)

        assert pod["status"]["phase"] == "Failed"
        assert pod["status"]["reason"] == "DeadlineExceeded"
        assert container_state(pod, "terminated")["exitCode"] == 143

    def test_init_containers_run_first(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str
    ) -> None:
        name = unique("init")
        manifest = pod_manifest(
            name,
            shell("cat /shared/order"),
            container={"volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
            spec={
                "volumes": [{"name": "shared", "emptyDir": {}}],
                "initContainers": [
                    {
                        "name": f"init-{step}",
                        "image": "example.test/tool:1",
                        "command": shell(f"echo {step} >> /shared/order"),
                        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                    }
                    for step in ("first", "second")
                ],
            },
        )
        create_pod(kube, namespace, manifest)

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        assert pod["status"]["phase"] == "Succeeded"
        assert [
            s["state"]["terminated"]["exitCode"] for s in pod["status"]["initContainerStatuses"]
        ] == [0, 0]
        assert pod_log(core, namespace, name, container="main") == "first\nsecond\n"


# --- environment and volumes ---------------------------------------------------


@pytest.mark.cluster
class TestEnvironment:
    def test_env_value_from_sources(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str
    ) -> None:
        secret, config_map, name = unique("creds"), unique("settings"), unique("env")
        kube.create(
            f"/api/v1/namespaces/{namespace}/secrets",
            {
                "metadata": {"name": secret},
                "data": {"token": base64.b64encode(b"s3cr3t-value").decode()},
            },
        )
        kube.create(
            f"/api/v1/namespaces/{namespace}/configmaps",
            {"metadata": {"name": config_map}, "data": {"level": "debug"}},
        )
        env = [
            {"name": "PLAIN", "value": "plain-value"},
            {"name": "EXPANDED", "value": "before-$(PLAIN)-after"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}},
            {
                "name": "LEVEL",
                "valueFrom": {"configMapKeyRef": {"name": config_map, "key": "level"}},
            },
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ]
        script = 'echo "$PLAIN|$EXPANDED|$TOKEN|$LEVEL|$POD_NAME|$POD_NAMESPACE"; echo "arg:$1"'
        create_pod(
            kube,
            namespace,
            pod_manifest(
                name, shell(script), container={"env": env, "args": ["ignored", "$(LEVEL)"]}
            ),
        )

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        assert pod["status"]["phase"] == "Succeeded"
        lines = pod_log(core, namespace, name).splitlines()
        assert (
            lines[0]
            == f"plain-value|before-plain-value-after|s3cr3t-value|debug|{name}|{namespace}"
        )
        assert lines[1] == "arg:debug"

    def test_bed_env_file_reaches_containers(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str, testbed: Testbed
    ) -> None:
        overrides = json.loads(testbed.paths.kubelet_env.read_text())
        name = unique("bedenv")
        create_pod(
            kube,
            namespace,
            pod_manifest(name, ["env"], container={"env": [{"name": "PATH", "value": "/pod/bin"}]}),
        )

        wait_for_phase(kube, namespace, name, ("Succeeded",))

        seen = dict(
            line.split("=", 1)
            for line in pod_log(core, namespace, name).splitlines()
            if "=" in line
        )
        for variable, value in overrides.items():
            if variable == "PATH":
                assert seen["PATH"] == f"{value}:/pod/bin"
            else:
                assert seen[variable] == value

    def test_missing_secret_waits_then_runs(self, kube: KubeApi, namespace: str) -> None:
        secret, name = unique("later"), unique("waits")
        env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}]
        create_pod(
            kube, namespace, pod_manifest(name, shell('test -n "$TOKEN"'), container={"env": env})
        )

        def waiting_reason() -> dict[str, Any] | None:
            pod = get_pod(kube, namespace, name)
            waiting = container_state(pod or {}, "waiting")
            return waiting if waiting.get("reason") == "CreateContainerConfigError" else None

        waiting = wait_for(waiting_reason, what="the container to wait for its secret", timeout=30)
        assert waiting["message"] == f'secret "{secret}" not found'
        assert get_pod(kube, namespace, name)["status"]["phase"] == "Pending"  # type: ignore[index]

        kube.create(
            f"/api/v1/namespaces/{namespace}/secrets",
            {"metadata": {"name": secret}, "data": {"token": base64.b64encode(b"x").decode()}},
        )
        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))
        assert pod["status"]["phase"] == "Succeeded"


@pytest.mark.cluster
class TestVolumes:
    def test_mount_paths_rewritten(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str, kubelet_state: Path
    ) -> None:
        secret, config_map, name = unique("docker"), unique("app"), unique("volumes")
        kube.create(
            f"/api/v1/namespaces/{namespace}/secrets",
            {
                "metadata": {"name": secret},
                "data": {".dockerconfigjson": base64.b64encode(b'{"auths":{}}').decode()},
            },
        )
        kube.create(
            f"/api/v1/namespaces/{namespace}/configmaps",
            {"metadata": {"name": config_map}, "data": {"settings.ini": "mode=fast"}},
        )
        script = (
            "cat /secrets/docker/config.json; echo; cat /etc/app/settings.ini; echo; "
            "echo written > /tmp/work/out; cat /tmp/work/out; echo $OUTPUT; pwd; "
            "echo /etc/application /x/tmp/work"
        )
        manifest = pod_manifest(
            name,
            shell(script),
            container={
                "env": [{"name": "OUTPUT", "value": "/tmp/work/result.json"}],
                "volumeMounts": [
                    {"name": "work", "mountPath": "/tmp/work"},
                    {"name": "docker", "mountPath": "/secrets/docker", "readOnly": True},
                    {"name": "app", "mountPath": "/etc/app"},
                ],
            },
            spec={
                "volumes": [
                    {"name": "work", "emptyDir": {}},
                    {
                        "name": "docker",
                        "secret": {
                            "secretName": secret,
                            "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                        },
                    },
                    {"name": "app", "configMap": {"name": config_map}},
                ]
            },
        )
        create_pod(kube, namespace, manifest)

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        assert pod["status"]["phase"] == "Succeeded", pod_log(core, namespace, name)
        lines = pod_log(core, namespace, name).splitlines()
        pod_folder = (
            kubelet_state.resolve() / "pods" / f"{namespace}_{name}_{pod['metadata']['uid']}"
        )
        assert lines[0] == '{"auths":{}}'
        assert lines[1] == "mode=fast"
        assert lines[2] == "written"
        assert lines[3] == f"{pod_folder}/volumes/work/result.json"
        assert lines[4] == f"{pod_folder}/work"
        # Only whole mount paths are rewritten.
        assert lines[5] == "/etc/application /x/tmp/work"


# --- logs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def counted(kube: KubeApi, namespace: str) -> str:
    """A finished pod whose log is the ten lines `line-1` to `line-10`."""
    name = unique("count")
    create_pod(
        kube,
        namespace,
        pod_manifest(name, shell("for i in 1 2 3 4 5 6 7 8 9 10; do echo line-$i; done")),
    )
    wait_for_phase(kube, namespace, name, ("Succeeded",))
    return name


@pytest.mark.cluster
class TestLogs:
    def test_full_log_via_client(
        self, core: client.CoreV1Api, namespace: str, counted: str
    ) -> None:
        assert pod_log(core, namespace, counted) == "".join(f"line-{i}\n" for i in range(1, 11))

    def test_tail_lines_via_client(
        self, core: client.CoreV1Api, namespace: str, counted: str
    ) -> None:
        assert pod_log(core, namespace, counted, tail_lines=3) == "line-8\nline-9\nline-10\n"

    def test_limit_bytes_via_client(
        self, core: client.CoreV1Api, namespace: str, counted: str
    ) -> None:
        assert pod_log(core, namespace, counted, limit_bytes=9) == "line-1\nli"

    def test_timestamps_via_client(
        self, core: client.CoreV1Api, namespace: str, counted: str
    ) -> None:
        lines = (
            pod_log(core, namespace, counted, timestamps=True, tail_lines=2).encode().splitlines()
        )
        assert len(lines) == 2
        assert all(TIMESTAMP.match(line) for line in lines)
        assert lines[1].endswith(b" line-10")

    def test_kubectl_logs_tail_and_limit(
        self, testbed: Testbed, kubeconfig: Path, namespace: str, counted: str
    ) -> None:
        kubectl = [
            str(testbed.binary("kubectl")),
            f"--kubeconfig={kubeconfig}",
            "-n",
            namespace,
            "logs",
            counted,
        ]

        tail = subprocess.run(
            [*kubectl, "--tail=2"], capture_output=True, text=True, timeout=60, check=True
        )
        limited = subprocess.run(
            [*kubectl, "--limit-bytes=6"], capture_output=True, text=True, timeout=60, check=True
        )

        assert tail.stdout == "line-9\nline-10\n"
        assert limited.stdout == "line-1"

    def test_stdout_and_stderr_interleave(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str
    ) -> None:
        name = unique("streams")
        script = "echo out-1; sleep 0.2; echo err-1 >&2; sleep 0.2; echo out-2; sleep 0.2; echo err-2 >&2"
        create_pod(kube, namespace, pod_manifest(name, shell(script)))
        wait_for_phase(kube, namespace, name, ("Succeeded",))

        assert pod_log(core, namespace, name) == "out-1\nerr-1\nout-2\nerr-2\n"

    def test_follow_streams_until_exit(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str
    ) -> None:
        name = unique("follow")
        create_pod(
            kube,
            namespace,
            pod_manifest(name, shell("for i in 1 2 3 4 5; do echo tick-$i; sleep 0.5; done")),
        )
        wait_for_phase(kube, namespace, name, ("Running",))

        started = time.monotonic()
        response = core.read_namespaced_pod_log(
            name, namespace, follow=True, _preload_content=False
        )
        received = b"".join(response.stream())
        followed_for = time.monotonic() - started

        assert received == b"".join(b"tick-%d\n" % i for i in range(1, 6))
        # The stream stayed open while the container printed its ticks.
        assert followed_for > 1.0
        wait_for_phase(kube, namespace, name, ("Succeeded",), timeout=10)

    def test_kubectl_follow(
        self, kube: KubeApi, testbed: Testbed, kubeconfig: Path, namespace: str
    ) -> None:
        name = unique("kfollow")
        create_pod(
            kube,
            namespace,
            pod_manifest(name, shell("for i in 1 2 3; do echo step-$i; sleep 0.5; done")),
        )
        wait_for_phase(kube, namespace, name, ("Running", "Succeeded"))

        result = subprocess.run(
            [
                str(testbed.binary("kubectl")),
                f"--kubeconfig={kubeconfig}",
                "-n",
                namespace,
                "logs",
                "-f",
                name,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

        assert result.stdout == "step-1\nstep-2\nstep-3\n"


# --- scheduling -------------------------------------------------------------


@pytest.mark.cluster
class TestScheduling:
    def assert_unschedulable(
        self, kube: KubeApi, namespace: str, name: str, fragment: str
    ) -> dict[str, Any]:
        pod = wait_for(
            lambda: (
                (p := get_pod(kube, namespace, name))
                and condition(p, "PodScheduled").get("reason") == "Unschedulable"
                and p
            ),
            what=f"pod {name} to be marked Unschedulable",
            timeout=30,
        )
        scheduled = condition(pod, "PodScheduled")
        assert scheduled["status"] == "False"
        assert fragment in scheduled["message"]
        assert pod["status"]["phase"] == "Pending"
        assert not pod["spec"].get("nodeName")
        return pod

    def test_node_selector_mismatch(self, kube: KubeApi, namespace: str) -> None:
        name = unique("selector")
        create_pod(
            kube,
            namespace,
            pod_manifest(name, ["true"], spec={"nodeSelector": {"disktype": "ssd"}}),
        )

        self.assert_unschedulable(kube, namespace, name, "nodeSelector disktype=ssd")

    def test_required_affinity_mismatch(self, kube: KubeApi, namespace: str) -> None:
        name = unique("affinity")
        term = {
            "matchExpressions": [
                {"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}
            ]
        }
        affinity = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
            }
        }
        create_pod(kube, namespace, pod_manifest(name, ["true"], spec={"affinity": affinity}))

        self.assert_unschedulable(kube, namespace, name, "no required node affinity term matches")

    def test_matching_affinity_binds(self, kube: KubeApi, namespace: str, node_name: str) -> None:
        name = unique("fits")
        term = {
            "matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node_name]}
            ]
        }
        affinity = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
            }
        }
        create_pod(
            kube,
            namespace,
            pod_manifest(
                name,
                ["true"],
                spec={"affinity": affinity, "nodeSelector": {"kubernetes.io/os": "linux"}},
            ),
        )

        pod = wait_for_phase(kube, namespace, name, ("Succeeded",))
        assert pod["spec"]["nodeName"] == node_name

    def test_untolerated_taint_blocks_until_removed(
        self, kube: KubeApi, namespace: str, node_name: str
    ) -> None:
        taint = {"key": "testbed.secapi.io/tainted", "value": "yes", "effect": "NoSchedule"}
        blocked, tolerant = unique("blocked"), unique("tolerant")
        node_path = f"/api/v1/nodes/{node_name}"
        kube.patch(node_path, {"spec": {"taints": [taint]}})
        try:
            create_pod(kube, namespace, pod_manifest(blocked, ["true"]))
            toleration = {
                "key": taint["key"],
                "operator": "Equal",
                "value": "yes",
                "effect": "NoSchedule",
            }
            create_pod(
                kube,
                namespace,
                pod_manifest(tolerant, ["true"], spec={"tolerations": [toleration]}),
            )

            self.assert_unschedulable(
                kube,
                namespace,
                blocked,
                "untolerated taint {testbed.secapi.io/tainted=yes:NoSchedule}",
            )
            assert (
                wait_for_phase(kube, namespace, tolerant, ("Succeeded",))["spec"]["nodeName"]
                == node_name
            )
        finally:
            kube.request(
                "PATCH",
                node_path,
                body=[{"op": "remove", "path": "/spec/taints"}],
                content_type="application/json-patch+json",
            )
        # Without the taint the waiting pod is scheduled again.
        assert (
            wait_for_phase(kube, namespace, blocked, ("Succeeded",))["spec"]["nodeName"]
            == node_name
        )


# --- fault switches ---------------------------------------------------------


@pytest.mark.cluster
class TestFaults:
    def test_truncate_log_drops_the_end(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str, kubelet_state: Path
    ) -> None:
        name = unique("truncate")
        labels = {"secapi.io/scan": name}
        with faults.injected(
            "truncate-log", namespace=namespace, labels=labels, state_dir=kubelet_state
        ):
            create_pod(
                kube, namespace, pod_manifest(name, shell("seq 1 100; echo END"), labels=labels)
            )
            pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        full = "".join(f"{i}\n" for i in range(1, 101)) + "END\n"
        served = pod_log(core, namespace, name)
        assert pod["status"]["phase"] == "Succeeded"
        assert full.startswith(served)
        assert len(served) == len(full) // 2
        assert "END" not in served

    def test_oom_kills_with_137(self, kube: KubeApi, namespace: str, kubelet_state: Path) -> None:
        name = unique("oom")
        labels = {"secapi.io/scan": name}
        with faults.injected("oom", namespace=namespace, labels=labels, state_dir=kubelet_state):
            create_pod(kube, namespace, pod_manifest(name, ["sleep", "300"], labels=labels))
            pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"), timeout=30)

        terminated = container_state(pod, "terminated")
        assert pod["status"]["phase"] == "Failed"
        assert terminated["reason"] == "OOMKilled"
        assert terminated["exitCode"] == 137

    def test_image_pull_never_starts(
        self, kube: KubeApi, namespace: str, kubelet_state: Path
    ) -> None:
        name = unique("pull")
        labels = {"secapi.io/scan": name}
        with faults.injected(
            "image-pull", namespace=namespace, labels=labels, state_dir=kubelet_state
        ):
            create_pod(kube, namespace, pod_manifest(name, ["true"], labels=labels))

            def waiting(reason: str) -> dict[str, Any] | None:
                pod = get_pod(kube, namespace, name)
                return (
                    pod if container_state(pod or {}, "waiting").get("reason") == reason else None
                )

            first = wait_for(lambda: waiting("ErrImagePull"), what="ErrImagePull", timeout=30)
            later = wait_for(
                lambda: waiting("ImagePullBackOff"), what="ImagePullBackOff", timeout=30
            )

        assert "example.test/tool:1" in container_state(first, "waiting")["message"]
        assert "example.test/tool:1" in container_state(later, "waiting")["message"]
        assert later["status"]["phase"] == "Pending"
        assert not os.path.exists(
            kubelet_state
            / "pods"
            / f"{namespace}_{name}_{later['metadata']['uid']}"
            / "processes.json"
        )

    def test_vanish_deletes_running_pod(
        self, kube: KubeApi, namespace: str, kubelet_state: Path
    ) -> None:
        name = unique("vanish")
        with faults.injected(
            "vanish",
            namespace=namespace,
            labels={"secapi.io/scan": name},
            seconds=2,
            state_dir=kubelet_state,
        ):
            create_pod(
                kube,
                namespace,
                pod_manifest(name, ["sleep", "300"], labels={"secapi.io/scan": name}),
            )
            wait_for_phase(kube, namespace, name, ("Running",))
            (pid,) = process_ids(kubelet_state, namespace, name)

            wait_for_gone(kube, namespace, name)

        assert not process_alive(pid)

    def test_unschedulable_stays_pending(
        self, kube: KubeApi, namespace: str, kubelet_state: Path
    ) -> None:
        name = unique("nosched")
        with faults.injected(
            "unschedulable",
            namespace=namespace,
            labels={"secapi.io/scan": name},
            state_dir=kubelet_state,
        ):
            create_pod(
                kube, namespace, pod_manifest(name, ["true"], labels={"secapi.io/scan": name})
            )
            pod = TestScheduling().assert_unschedulable(
                kube, namespace, name, "test bed fault unschedulable"
            )
        assert pod["status"]["conditions"][0]["reason"] == "Unschedulable"

    def test_hang_runs_until_deleted(
        self, kube: KubeApi, namespace: str, kubelet_state: Path
    ) -> None:
        name = unique("hang")
        with faults.injected(
            "hang", namespace=namespace, labels={"secapi.io/scan": name}, state_dir=kubelet_state
        ):
            create_pod(
                kube, namespace, pod_manifest(name, ["true"], labels={"secapi.io/scan": name})
            )
            wait_for_phase(kube, namespace, name, ("Running",))

        time.sleep(2)  # `true` ended long ago; the container must still count as running
        pod = get_pod(kube, namespace, name)
        assert pod is not None
        assert pod["status"]["phase"] == "Running"
        assert container_state(pod, "running")

        delete_pod(kube, namespace, name)
        wait_for_gone(kube, namespace, name)

    def test_delay_start_waits(self, kube: KubeApi, namespace: str) -> None:
        name = unique("delay")
        created = time.time()
        create_pod(
            kube,
            namespace,
            pod_manifest(name, ["true"], annotations={faults.ANNOTATION: "delay-start 3"}),
        )

        waiting = wait_for(
            lambda: (
                (p := get_pod(kube, namespace, name))
                and container_state(p, "waiting").get("reason") == "ContainerCreating"
                and p
            ),
            what="the container to wait in ContainerCreating",
            timeout=10,
        )
        pod = wait_for_phase(kube, namespace, name, ("Succeeded",), timeout=30)

        assert waiting["status"]["phase"] == "Pending"
        started = calendar.timegm(
            time.strptime(container_state(pod, "terminated")["startedAt"], "%Y-%m-%dT%H:%M:%SZ")
        )
        # startedAt has whole seconds, so allow one second of rounding down.
        assert started - created >= 2.0

    def test_annotation_selects_fault(self, kube: KubeApi, namespace: str) -> None:
        name = unique("annotated")
        create_pod(
            kube,
            namespace,
            pod_manifest(name, ["sleep", "300"], annotations={faults.ANNOTATION: "oom 0.2"}),
        )

        pod = wait_for_phase(kube, namespace, name, ("Failed", "Succeeded"), timeout=30)

        assert container_state(pod, "terminated")["reason"] == "OOMKilled"

    def test_rule_matches_only_its_labels(
        self, kube: KubeApi, namespace: str, kubelet_state: Path
    ) -> None:
        hit, miss = unique("hit"), unique("miss")
        with faults.injected(
            "oom", namespace=namespace, labels={"secapi.io/scan": hit}, state_dir=kubelet_state
        ):
            create_pod(
                kube, namespace, pod_manifest(hit, ["sleep", "2"], labels={"secapi.io/scan": hit})
            )
            create_pod(
                kube, namespace, pod_manifest(miss, ["sleep", "2"], labels={"secapi.io/scan": miss})
            )
            hit_pod = wait_for_phase(kube, namespace, hit, ("Failed", "Succeeded"), timeout=30)
            miss_pod = wait_for_phase(kube, namespace, miss, ("Failed", "Succeeded"), timeout=30)

        assert container_state(hit_pod, "terminated")["reason"] == "OOMKilled"
        assert container_state(miss_pod, "terminated")["reason"] == "Completed"

    def test_invalid_fault_name_rejected(self, kubelet_state: Path) -> None:
        with pytest.raises(faults.FaultError, match="unknown fault 'explode'"):
            faults.add_fault("explode", namespace="any", state_dir=kubelet_state)


# --- Jobs through the real Job controller -------------------------------------


def job_manifest(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {
                "metadata": {"labels": {"secapi.io/scan": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 2,
                    "containers": [
                        {"name": "scan", "image": "example.test/trivy:1", "command": command}
                    ],
                },
            },
        },
    }


def wait_for_job_condition(
    kube: KubeApi, namespace: str, name: str, timeout: float = 60.0
) -> dict[str, Any]:
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"

    def finished() -> dict[str, Any] | None:
        job = kube.get(path)
        for item in job.get("status", {}).get("conditions") or []:
            if item["type"] in ("Complete", "Failed") and item["status"] == "True":
                return job
        return None

    return wait_for(finished, what=f"job {name} to complete or fail", timeout=timeout)


def job_pods(kube: KubeApi, namespace: str, name: str) -> list[dict[str, Any]]:
    return kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"job-name={name}")[
        "items"
    ]


@pytest.mark.cluster
class TestJobs:
    def test_job_completes(self, kube: KubeApi, namespace: str) -> None:
        name = unique("job-ok")
        kube.create(
            f"/apis/batch/v1/namespaces/{namespace}/jobs", job_manifest(name, shell("echo scanned"))
        )

        job = wait_for_job_condition(kube, namespace, name)

        assert [c["type"] for c in job["status"]["conditions"] if c["status"] == "True"][
            -1
        ] == "Complete"
        assert job["status"]["succeeded"] == 1

    def test_failing_job_fails_with_exit_code(self, kube: KubeApi, namespace: str) -> None:
        name = unique("job-fail")
        kube.create(
            f"/apis/batch/v1/namespaces/{namespace}/jobs",
            job_manifest(name, shell("echo broken >&2; exit 7")),
        )

        job = wait_for_job_condition(kube, namespace, name)

        failed = [c for c in job["status"]["conditions"] if c["type"] == "Failed"]
        assert failed[0]["reason"] == "BackoffLimitExceeded"
        (pod,) = job_pods(kube, namespace, name)
        assert container_state(pod, "terminated")["exitCode"] == 7

    def test_job_deadline_deletes_running_pod(self, kube: KubeApi, namespace: str) -> None:
        name = unique("job-deadline")
        kube.create(
            f"/apis/batch/v1/namespaces/{namespace}/jobs",
            job_manifest(name, ["sleep", "300"], activeDeadlineSeconds=3),
        )

        job = wait_for_job_condition(kube, namespace, name)

        failed = [c for c in job["status"]["conditions"] if c["type"] == "Failed"]
        assert failed[0]["reason"] == "DeadlineExceeded"
        wait_for(
            lambda: not job_pods(kube, namespace, name),
            what=f"the pods of job {name} to be deleted",
            timeout=30,
        )


# --- many pods at once --------------------------------------------------------


@pytest.mark.cluster
class TestScale:
    def test_fifty_pods_succeed(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str
    ) -> None:
        label = unique("batch")
        names = [f"{label}-{index}" for index in range(50)]
        started = time.monotonic()
        for name in names:
            create_pod(
                kube,
                namespace,
                pod_manifest(name, shell("echo $HOSTNAME; sleep 1"), labels={"batch": label}),
            )

        def all_finished() -> list[dict[str, Any]] | None:
            pods = kube.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"batch={label}")[
                "items"
            ]
            done = [p for p in pods if p.get("status", {}).get("phase") in ("Succeeded", "Failed")]
            return pods if len(done) == len(names) else None

        pods = wait_for(all_finished, what="50 pods to finish", timeout=120)
        elapsed = time.monotonic() - started

        assert sorted(p["status"]["phase"] for p in pods) == ["Succeeded"] * 50
        assert all(pod_log(core, namespace, name) == f"{name}\n" for name in names)
        # 50 one-second pods run side by side, not one after the other.
        assert elapsed < 60


# --- a kubelet of the test's own ------------------------------------------------


@dataclass
class PrivateKubelet:
    node: str
    state_dir: Path
    log: Path
    env_file: Path
    kubeconfig: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "ready").unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.testbed.kubelet",
                    f"--kubeconfig={self.kubeconfig}",
                    f"--state-dir={self.state_dir}",
                    "--port=0",
                    f"--node-name={self.node}",
                    f"--env-file={self.env_file}",
                    "--no-scheduler",
                ],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process
        wait_for(
            lambda: (self.state_dir / "ready").exists() or process.poll() is not None,
            what=f"kubelet {self.node} to be ready",
            timeout=60,
        )
        assert process.poll() is None, f"kubelet {self.node} exited: {self.log.read_text()[-3000:]}"

    def kill(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
        self.process.wait(timeout=30)


@pytest.fixture(scope="class")
def private_kubelet(
    kube: KubeApi, kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrivateKubelet]:
    folder = tmp_path_factory.mktemp("private-kubelet")
    env_file = folder / "env.json"
    env_file.write_text(
        json.dumps(
            {"PATH": "/opt/testbed-tools", "FROM_ENV_FILE": "override", "SHARED": "from-file"}
        )
    )
    kubelet = PrivateKubelet(
        node=unique("private-node"),
        state_dir=folder / "state",
        log=folder / "kubelet.log",
        env_file=env_file,
        kubeconfig=kubeconfig,
    )
    kubelet.start()
    try:
        yield kubelet
    finally:
        if kubelet.process is not None and kubelet.process.poll() is None:
            kubelet.kill(signal.SIGTERM)
        for path in (
            f"/api/v1/nodes/{kubelet.node}",
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{kubelet.node}",
        ):
            try:
                kube.delete(path)
            except ApiError as error:
                if error.status != 404:
                    raise


@pytest.mark.cluster
class TestPrivateKubelet:
    def test_env_file_path_prepended(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str, private_kubelet: PrivateKubelet
    ) -> None:
        name = unique("envfile")
        env = [{"name": "PATH", "value": "/usr/bin:/bin"}, {"name": "SHARED", "value": "from-pod"}]
        manifest = pod_manifest(
            name, ["/usr/bin/env"], container={"env": env}, spec={"nodeName": private_kubelet.node}
        )
        create_pod(kube, namespace, manifest)

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        assert pod["status"]["phase"] == "Succeeded"
        seen = dict(line.split("=", 1) for line in pod_log(core, namespace, name).splitlines())
        assert seen["PATH"] == "/opt/testbed-tools:/usr/bin:/bin"
        assert seen["FROM_ENV_FILE"] == "override"
        assert seen["SHARED"] == "from-file"
        # The kubelet's own environment does not leak into containers.
        assert "KUBECONFIG" not in seen

    def test_secret_values_never_logged(
        self, kube: KubeApi, core: client.CoreV1Api, namespace: str, private_kubelet: PrivateKubelet
    ) -> None:
        secret, name = unique("hidden"), unique("uses-secret")
        value = f"never-log-{uuid.uuid4().hex}"
        kube.create(
            f"/api/v1/namespaces/{namespace}/secrets",
            {
                "metadata": {"name": secret},
                "data": {"password": base64.b64encode(value.encode()).decode()},
            },
        )
        manifest = pod_manifest(
            name,
            shell('test "$PASSWORD" = "$(cat /secret/password)"'),
            container={
                "env": [
                    {
                        "name": "PASSWORD",
                        "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}},
                    }
                ],
                "volumeMounts": [{"name": "secret", "mountPath": "/secret"}],
            },
            spec={
                "nodeName": private_kubelet.node,
                "volumes": [{"name": "secret", "secret": {"secretName": secret}}],
            },
        )
        create_pod(kube, namespace, manifest)

        pod = wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"))

        assert pod["status"]["phase"] == "Succeeded"
        assert f"pod {namespace}/{name}" in private_kubelet.log.read_text()
        assert value not in private_kubelet.log.read_text()

    def test_idle_kubelet_uses_little_cpu(self, private_kubelet: PrivateKubelet) -> None:
        assert private_kubelet.process is not None
        process = psutil.Process(private_kubelet.process.pid)
        before = process.cpu_times()
        time.sleep(10)
        after = process.cpu_times()

        used = (after.user - before.user) + (after.system - before.system)
        # One lease renewal in ten seconds costs a few milliseconds.
        assert used < 0.3

    def test_restart_fails_lost_pods(
        self, kube: KubeApi, namespace: str, private_kubelet: PrivateKubelet
    ) -> None:
        name = unique("lost")
        create_pod(
            kube,
            namespace,
            pod_manifest(name, ["sleep", "300"], spec={"nodeName": private_kubelet.node}),
        )
        wait_for_phase(kube, namespace, name, ("Running",))
        (pid,) = process_ids(private_kubelet.state_dir, namespace, name)

        # A crash: the kubelet gets no chance to stop its processes.
        private_kubelet.kill(signal.SIGKILL)
        assert process_alive(pid)
        private_kubelet.start()

        pod = wait_for_phase(kube, namespace, name, ("Failed",), timeout=30)
        assert pod["status"]["reason"] == "KubeletRestarted"
        terminated = container_state(pod, "terminated")
        assert terminated["reason"] == "ContainerStatusUnknown"
        assert terminated["exitCode"] == 137
        assert not process_alive(pid)

        # New pods still run after the restart.
        again = unique("after")
        create_pod(
            kube, namespace, pod_manifest(again, ["true"], spec={"nodeName": private_kubelet.node})
        )
        assert (
            wait_for_phase(kube, namespace, again, ("Succeeded", "Failed"))["status"]["phase"]
            == "Succeeded"
        )
