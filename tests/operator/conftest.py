"""Fixtures of the operator tests: the CRD, namespaces, RBAC-bound credentials and the operator.

The operator runs as `secapi operator` in a subprocess, so tests can kill
and restart it, with the token of a ServiceAccount bound to exactly the rules
of deploy/rbac/rules.yaml: a rule missing there fails here. The API executor
runs with the API's rules the same way. Each test module gets a database of
its own in the bed's PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
import yaml
from sqlalchemy.engine import make_url

from secapi.core.db.migrate import upgrade_to_head
from secapi.core.executors.kube_client import KubeClient, load_configuration
from secapi.core.settings import Settings
from tests.testbed.bed import Testbed
from tests.testbed.paths import REPO_ROOT

CRD_FILE = REPO_ROOT / "crds" / "scans.secapi.io.yaml"
RULES_FILE = REPO_ROOT / "deploy" / "rbac" / "rules.yaml"
SECAPI = str(Path(sys.executable).parent / "secapi")
FINAL_PHASES = ("Completed", "Failed")

pytestmark = pytest.mark.cluster


def kubectl(testbed: Testbed, *args: str, input_text: str | None = None, check: bool = True) -> str:
    """Run the bed's kubectl as cluster admin and return its output."""
    result = subprocess.run(
        [str(Path(testbed.env["SECAPI_TEST_BIN"]) / "kubectl"), *args],
        input=input_text,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": testbed.env["KUBECONFIG"]},
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result.stdout


@pytest.fixture(scope="session")
def crd(testbed: Testbed, kubeconfig: Path) -> None:
    """Install the Scan CRD and wait until the API server serves it."""
    kubectl(testbed, "apply", "-f", str(CRD_FILE))
    kubectl(testbed, "wait", "--for=condition=Established", "crd/scans.secapi.io", "--timeout=60s")


@pytest_asyncio.fixture
async def admin(testbed: Testbed, kubeconfig: Path) -> AsyncIterator[KubeClient]:
    """A client with the bed's admin credentials, for setting up and checking."""
    client = KubeClient(load_configuration(str(kubeconfig)))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def database_url(testbed: Testbed) -> Iterator[str]:
    """A new database in the bed's PostgreSQL server, migrated to head, dropped afterwards."""
    admin_url = testbed.env["DATABASE_URL"]
    name = f"secapi_operator_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_to_head(Settings(database_url=url))
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one query on the test database and return its rows."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        return connection.execute(sql, params).fetchall()  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def namespace(admin: KubeClient, crd: None, testbed: Testbed) -> AsyncIterator[str]:
    """A new namespace for one test, deleted afterwards with everything in it."""
    name = f"op-{uuid.uuid4().hex[:10]}"
    await admin.request(
        "POST",
        "/api/v1/namespaces",
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    try:
        yield name
    finally:
        # Scans carry no finalizer, so they go with the namespace; clear faults of this namespace.
        from tests.testbed.kubelet.faults import clear_faults

        clear_faults(namespace=name, state_dir=testbed.paths.root / "kubelet")
        await admin.request("DELETE", f"/api/v1/namespaces/{name}")


def rbac_rules(component: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load(RULES_FILE.read_text())[component]["namespaced"]
    return rules


async def service_account_kubeconfig(
    admin: KubeClient, *, namespace: str, component: str, kubeconfig: Path, out: Path
) -> Path:
    """Create a ServiceAccount bound to the component's rules and write a kubeconfig with its token."""
    account = f"secapi-{component}"
    await admin.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}},
    )
    await admin.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
        body={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": account},
            "rules": rbac_rules(component),
        },
    )
    await admin.request(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        body={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )
    token_request = await admin.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        body={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )
    token = token_request["status"]["token"]

    return write_token_kubeconfig(
        kubeconfig, token=token, user=account, namespace=namespace, out=out
    )


def write_token_kubeconfig(
    kubeconfig: Path, *, token: str, user: str, namespace: str, out: Path
) -> Path:
    """Write a kubeconfig for the bed's API server that authenticates with `token`."""
    admin_config = yaml.safe_load(kubeconfig.read_text())
    cluster = admin_config["clusters"][0]["cluster"]
    if "certificate-authority" in cluster:
        ca = base64.b64encode(Path(cluster["certificate-authority"]).read_bytes()).decode()
    else:
        ca = cluster["certificate-authority-data"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "bed",
                "cluster": {"server": cluster["server"], "certificate-authority-data": ca},
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": user,
                "context": {"cluster": "bed", "user": user, "namespace": namespace},
            }
        ],
        "current-context": user,
    }
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


@dataclass
class OperatorProcess:
    """`secapi operator` in a subprocess; its output goes to a log file shown on failure."""

    namespace: str
    env: dict[str, str]
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _handles: list[Any] = field(default_factory=list)

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "the operator runs already"
        handle = self.log_file.open("ab")
        self._handles.append(handle)
        handle.write(f"\n===== operator start {self.starts + 1} =====\n".encode())
        handle.flush()
        self.process = subprocess.Popen(
            [SECAPI, "operator", "--namespace", self.namespace],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        self.starts += 1

    def kill(self) -> None:
        """Kill the operator with SIGKILL, as a crash or an evicted pod would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        for handle in self._handles:
            handle.close()
        self._handles.clear()

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def operator_environment(
    *, testbed: Testbed, kubeconfig: Path, database_url: str, **overrides: str
) -> dict[str, str]:
    """Return the operator's environment: settings for quick tests against the bed."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SECAPI_", "TRIVY_", "KUBERNETES_"))
    }
    env.update(
        {
            "KUBECONFIG": str(kubeconfig),
            "DATABASE_URL": database_url,
            "SECAPI_SCANNER__OFFLINE": "true",
            "SECAPI_SCANNER__INSECURE_REGISTRIES": "true",
            "SECAPI_SCANNER__MAX_CONCURRENT_SCANS": "3",
            "SECAPI_SCANNER__TIMEOUT_SECONDS": "120",
            "SECAPI_SCANNER__QUEUE_TIMEOUT_SECONDS": "600",
            "SECAPI_KUBERNETES__RESYNC_SECONDS": "1",
            "SECAPI_KUBERNETES__PENDING_TIMEOUT_SECONDS": "20",
            "SECAPI_KUBERNETES__IMAGE_PULL_GRACE_SECONDS": "3",
            "SECAPI_KUBERNETES__SCANNER_IMAGE": "scanner.invalid/secapi-test/trivy:0.74.0",
            "SECAPI_KUBERNETES__CPU_REQUEST": "10m",
            "SECAPI_KUBERNETES__MEMORY_REQUEST": "16Mi",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


OperatorFactory = Callable[..., Awaitable[OperatorProcess]]


@pytest_asyncio.fixture
async def start_operator(
    request: pytest.FixtureRequest,
    testbed: Testbed,
    kubeconfig: Path,
    admin: KubeClient,
    database_url: str,
    tmp_path: Path,
) -> AsyncIterator[OperatorFactory]:
    """Return a factory that starts the operator for a namespace under the operator's RBAC rules."""
    started: list[OperatorProcess] = []

    async def start(namespace: str, **overrides: str) -> OperatorProcess:
        config = await service_account_kubeconfig(
            admin,
            namespace=namespace,
            component="operator",
            kubeconfig=kubeconfig,
            out=tmp_path / f"operator-{namespace}.kubeconfig",
        )
        operator = OperatorProcess(
            namespace=namespace,
            env=operator_environment(
                testbed=testbed, kubeconfig=config, database_url=database_url, **overrides
            ),
            log_file=tmp_path / f"operator-{namespace}.log",
        )
        operator.start()
        started.append(operator)
        return operator

    yield start

    failed = getattr(request.node, "rep_call", None)
    for operator in started:
        operator.stop()
        if failed is not None and failed.failed:
            sys.stderr.write(f"\n----- operator log ({operator.namespace}) -----\n")
            sys.stderr.write(operator.log_text()[-20000:])


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Keep each phase's report on the test item, so fixtures can show logs of failed tests.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def scan_manifest(name: str, image: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "secapi.io/v1alpha1",
        "kind": "Scan",
        "metadata": {"name": name},
        "spec": {"image": image, **spec},
    }


async def wait_for(
    check: Callable[[], Awaitable[Any]],
    *,
    within: float,
    interval: float = 0.5,
    what: str = "condition",
) -> Any:
    """Call `check` until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {within} s waiting for {what}; last value: {last!r}")


async def wait_for_phase(
    admin: KubeClient,
    namespace: str,
    name: str,
    phases: tuple[str, ...] = FINAL_PHASES,
    *,
    within: float = 180,
) -> dict[str, Any]:
    """Wait until a Scan's status.phase is one of `phases` and return the Scan."""

    async def check() -> dict[str, Any] | None:
        body = await admin.get_scan(namespace, name)
        if body is not None and (body.get("status") or {}).get("phase") in phases:
            return body
        return None

    result: dict[str, Any] = await wait_for(check, within=within, what=f"Scan {name} in {phases}")
    return result


def trivy_report(testbed: Testbed, image: str, *extra: str) -> dict[str, Any]:
    """Return what the bed's Trivy reports for an image, run directly against the fixture DB."""
    result = subprocess.run(
        [
            testbed.env["TRIVY_BIN"],
            "image",
            "--cache-dir",
            testbed.env["SECAPI_TEST_TRIVY_CACHE"],
            "--cache-backend",
            "memory",
            "--skip-db-update",
            "--skip-java-db-update",
            "--offline-scan",
            "--skip-version-check",
            "--disable-telemetry",
            "--image-src",
            "remote",
            "--insecure",
            "--quiet",
            "--format",
            "json",
            *extra,
            image,
        ],
        capture_output=True,
        timeout=300,
        check=True,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return report
