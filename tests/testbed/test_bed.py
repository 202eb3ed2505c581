"""Tests that the test bed is made of real, working parts, and that it cleans up after itself.

The first group talks to the running bed: the API server's version, a Job
that runs through the fake kubelet and whose output comes back through the
real `kubectl logs`, Pod Security admission, PostgreSQL, Redis and the
registry. The second group checks the process handling `down` relies on,
with short-lived processes of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.testbed import bed, fixture_images, services
from tests.testbed.bed import Testbed
from tests.testbed.guard import ForeignClusterError, check_testbed_kubeconfig
from tests.testbed.paths import ENV_NAMES, BedPaths
from tests.testbed.processes import ProcessRecord, find_process, spawn, stop
from tests.testbed.state import BedState, load_state

KUBERNETES_VERSION = "v1.37.2"


@pytest.fixture(scope="module")
def api(testbed: Testbed, kubeconfig: Path) -> Iterator[client.ApiClient]:
    # An explicit file: kubernetes.config reads KUBECONFIG once, at import time.
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield api_client
    finally:
        api_client.close()


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    name = f"testbed-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)


def _shell_pod(name: str, script: str, *, privileged: bool = False) -> client.V1Pod:
    container = client.V1Container(
        name="main",
        image="busybox:1.36",
        command=["/bin/sh", "-c", script],
    )
    if privileged:
        container.security_context = client.V1SecurityContext(privileged=True)
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(restart_policy="Never", containers=[container]),
    )


def _wait_for_job(batch: client.BatchV1Api, namespace: str, name: str, timeout: float) -> str:
    """Return the type of the Job's final condition (Complete or Failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = batch.read_namespaced_job_status(name, namespace)
        for condition in job.status.conditions or []:
            if condition.type in ("Complete", "Failed") and condition.status == "True":
                return str(condition.type)
        time.sleep(0.5)
    raise AssertionError(f"Job {namespace}/{name} did not finish within {timeout:.0f} s")


# --- the running bed --------------------------------------------------------


@pytest.mark.cluster
def test_server_version_is_pinned(api: client.ApiClient) -> None:
    version = client.VersionApi(api).get_code()
    assert version.git_version == KUBERNETES_VERSION


@pytest.mark.cluster
def test_kubectl_matches_server(testbed: Testbed, kubeconfig: Path) -> None:
    result = subprocess.run(
        [str(testbed.binary("kubectl")), f"--kubeconfig={kubeconfig}", "version", "-o", "yaml"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    versions = yaml.safe_load(result.stdout)
    assert versions["clientVersion"]["gitVersion"] == KUBERNETES_VERSION
    assert versions["serverVersion"]["gitVersion"] == KUBERNETES_VERSION


@pytest.mark.cluster
def test_job_output_reaches_kubectl_logs(
    testbed: Testbed, kubeconfig: Path, api: client.ApiClient, namespace: str
) -> None:
    marker = f"job-output-{uuid.uuid4().hex}"
    pod = _shell_pod("unused", f"echo {marker}; echo second line")
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name="echo"),
        spec=client.V1JobSpec(
            backoff_limit=0,
            template=client.V1PodTemplateSpec(spec=pod.spec),
        ),
    )
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, job)

    assert _wait_for_job(batch, namespace, "echo", timeout=90) == "Complete"
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=echo")
    assert len(pods.items) == 1
    assert pods.items[0].status.phase == "Succeeded"

    result = subprocess.run(
        [
            str(testbed.binary("kubectl")),
            f"--kubeconfig={kubeconfig}",
            "--namespace",
            namespace,
            "logs",
            pods.items[0].metadata.name,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [marker, "second line"]


@pytest.mark.cluster
def test_restricted_namespace_rejects_privileged_pod(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    privileged = _shell_pod("privileged", "true", privileged=True)

    # The same pod passes where no Pod Security level is enforced, so the
    # rejection below comes from the namespace label and nothing else.
    core.create_namespaced_pod(namespace, privileged, dry_run="All")

    core.patch_namespace(
        namespace,
        {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
    )
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_pod(namespace, privileged, dry_run="All")
    assert caught.value.status == 403
    assert "violates PodSecurity" in caught.value.body
    assert "privileged" in caught.value.body


def test_postgres_answers(testbed: Testbed) -> None:
    with psycopg.connect(testbed.env["DATABASE_URL"], connect_timeout=5) as connection:
        database, version = connection.execute(
            "SELECT current_database(), current_setting('server_version_num')::int"
        ).fetchone()
        # A temporary table is private to this connection, so a fixed name cannot collide.
        connection.execute("CREATE TEMPORARY TABLE probe (value text)")
        connection.execute("INSERT INTO probe VALUES ('stored')")
        stored = connection.execute("SELECT value FROM probe").fetchone()
    assert database == "secapi"
    assert version >= 150000
    assert stored == ("stored",)


def test_redis_answers(testbed: Testbed) -> None:
    connection = redis.Redis.from_url(testbed.env["REDIS_URL"], socket_timeout=5)
    key, value = f"testbed:{uuid.uuid4().hex}", uuid.uuid4().hex
    try:
        assert connection.set(key, value, ex=60)
        assert connection.get(key) == value.encode()
    finally:
        connection.delete(key)
        connection.close()


def test_registry_serves_fixture_catalog(testbed: Testbed) -> None:
    expected = [(entry["name"], str(entry["tag"])) for entry in fixture_images.load_catalog()]
    assert expected, "images/catalog.yaml lists no images"

    registry = testbed.registry
    with urllib.request.urlopen(f"http://{registry}/v2/_catalog", timeout=10) as response:
        served = set(json.load(response)["repositories"])
    for name, tag in expected:
        assert name in served, f"{name} is missing from the registry's catalog {sorted(served)}"
        url = f"http://{registry}/v2/{name}/tags/list"
        with urllib.request.urlopen(url, timeout=10) as response:
            tags = json.load(response)["tags"] or []
        assert tag in tags, f"{name}:{tag} is missing; the registry has tags {tags}"


def test_env_file_has_exactly_the_contract_variables(testbed: Testbed) -> None:
    values = bed.read_env_file(testbed.paths.env_file)
    assert list(values) == list(ENV_NAMES)
    assert Path(values["TRIVY_BIN"]).name == "trivy"
    assert os.access(values["TRIVY_BIN"], os.X_OK)
    for binary in ("kubectl", "helm", "kube-apiserver", "kube-controller-manager", "etcd"):
        assert os.access(Path(values["SECAPI_TEST_BIN"]) / binary, os.X_OK), binary
    assert values["SECAPI_TEST_REGISTRY"].startswith("127.0.0.1:")


def test_servers_listen_on_loopback_only(testbed: Testbed) -> None:
    state = load_state(testbed.paths)
    assert state is not None
    for record in state.processes.values():
        process = find_process(record)
        assert process is not None, f"{record.name} (process {record.pid}) is not running"
        family = [process, *process.children(recursive=True)]
        for member in family:
            for connection in member.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    assert connection.laddr.ip == "127.0.0.1", (
                        f"{record.name} listens on {connection.laddr.ip}:{connection.laddr.port}"
                    )


def test_status_reports_live_bed(testbed: Testbed) -> None:
    healthy, report = bed.status(testbed.paths)
    assert healthy, report
    for name in ("postgres", "redis", "registry", "etcd", "kube-apiserver"):
        assert name in report


def test_guard_rejects_foreign_kubeconfig(
    testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foreign = tmp_path / "config"
    foreign.write_text(testbed.kubeconfig.read_text())
    monkeypatch.setenv("KUBECONFIG", str(foreign))
    with pytest.raises(ForeignClusterError, match="not the test bed's"):
        check_testbed_kubeconfig(testbed.paths)

    monkeypatch.setenv("KUBECONFIG", str(testbed.kubeconfig))
    assert check_testbed_kubeconfig(testbed.paths) == testbed.kubeconfig


# --- process handling, on processes of the test's own -----------------------


def _sleeper(tmp_path: Path, script: str) -> ProcessRecord:
    return spawn("sleeper", [sys.executable, "-c", script], log=tmp_path / "sleeper.log")


def test_stop_ends_process_group_and_escaped_children(tmp_path: Path) -> None:
    # The child starts its own session, as the fake kubelet's pod processes may.
    pid_file = tmp_path / "child.pid"
    script = (
        "import os, subprocess, time\n"
        "child = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        f"open('{pid_file}.tmp', 'w').write(str(child.pid))\n"
        f"os.rename('{pid_file}.tmp', '{pid_file}')\n"
        "time.sleep(300)\n"
    )
    record = _sleeper(tmp_path, script)
    deadline = time.monotonic() + 10
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the sleeper did not start its child"
        time.sleep(0.05)
    child = psutil.Process(int(pid_file.read_text()))
    assert os.getpgid(child.pid) != record.pid

    assert stop(record, timeout=5)
    assert find_process(record) is None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_reused_process_id_counts_as_dead(tmp_path: Path) -> None:
    record = _sleeper(tmp_path, "import time; time.sleep(300)")
    try:
        impostor = ProcessRecord(
            name=record.name,
            pid=record.pid,
            create_time=record.create_time - 1000,
            log=record.log,
        )
        assert find_process(impostor) is None
        # Stopping the impostor must leave the real process alone.
        assert stop(impostor) is False
        assert find_process(record) is not None
    finally:
        stop(record)


def test_env_file_round_trip(tmp_path: Path) -> None:
    paths = BedPaths(root=tmp_path)
    values = {name: f"value of {name} with 'quotes' and $dollar" for name in ENV_NAMES}
    bed.write_env_file(paths, values)
    assert bed.read_env_file(paths.env_file) == values
    shell = subprocess.run(
        ["/bin/sh", "-c", f'. {paths.env_file} && printf %s "$DATABASE_URL"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout == values["DATABASE_URL"]


def test_up_cleans_dead_bed_record(tmp_path: Path) -> None:
    paths = BedPaths(root=tmp_path)
    record = _sleeper(tmp_path, "import time; time.sleep(300)")
    state = BedState(owner="cli", complete=True)
    state.processes["redis"] = record
    state.facts["REDIS_URL"] = "redis://127.0.0.1:1/0"
    state.save(paths)
    (paths.data).mkdir()
    paths.env_file.write_text("export REDIS_URL=redis://127.0.0.1:1/0\n")

    # The sleeper is alive but is not Redis, so the health check fails and `up` cleans up.
    assert bed._clean_previous(paths, load_state(paths)).reusable is None
    assert find_process(record) is None
    assert not paths.state_file.exists()
    assert not paths.env_file.exists()
    assert not paths.data.exists()


def _bed_with_redis(tmp_path: Path, *, fingerprint: str) -> tuple[BedPaths, ProcessRecord]:
    """Record a complete bed made of one real Redis, the cheapest server to start."""
    paths = BedPaths(root=tmp_path / "bed")
    paths.data.mkdir(parents=True)
    state = BedState(owner="cli", complete=True, fingerprint=fingerprint)
    started = services.start_redis(paths, lambda record: None)
    state.processes["redis"] = started.record
    state.facts.update(started.facts)
    state.save(paths)
    paths.env_file.write_text(f"export REDIS_URL={started.facts['REDIS_URL']}\n")
    return paths, started.record


def test_up_reuses_current_healthy_bed(tmp_path: Path) -> None:
    paths, record = _bed_with_redis(tmp_path, fingerprint=bed.source_fingerprint())
    try:
        previous = bed._clean_previous(paths, load_state(paths))
        assert previous.reusable is not None
        assert previous.reusable.processes["redis"] == record
        assert find_process(record) is not None
        assert paths.env_file.exists()
    finally:
        stop(record)


def test_up_replaces_bed_of_older_code(tmp_path: Path) -> None:
    paths, record = _bed_with_redis(tmp_path, fingerprint="older-code")
    try:
        previous = bed._clean_previous(paths, load_state(paths))
        assert previous.reusable is None
        assert previous.owner == "cli"
        assert find_process(record) is None
        assert not paths.env_file.exists()
    finally:
        stop(record)


def test_stop_sends_the_recorded_signal(tmp_path: Path) -> None:
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda *_: (print('got SIGINT', flush=True), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    record = spawn(
        "sleeper",
        [sys.executable, "-c", script],
        log=tmp_path / "sleeper.log",
        stop_signal=signal.SIGINT,
    )
    deadline = time.monotonic() + 10
    while "ready" not in (tmp_path / "sleeper.log").read_text():
        assert time.monotonic() < deadline, "the sleeper did not start"
        time.sleep(0.05)
    assert stop(record, timeout=5)
    assert "got SIGINT" in (tmp_path / "sleeper.log").read_text()
