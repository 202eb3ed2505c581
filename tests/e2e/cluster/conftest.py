"""The end-to-end suite of the Kubernetes mode: the REST API, the operator and Scan resources.

The same tests run in two places, chosen by environment variables:

On an installed cluster, when SECAPI_E2E_BASE_URL is set (tests/kind/run.sh
sets it after `helm install`):
    SECAPI_E2E_BASE_URL        the API as reached from here, such as a port-forward
                               on 127.0.0.1; used as is
    SECAPI_E2E_KUBECONFIG      kubeconfig of that cluster, used by `kubectl get scans`
    SECAPI_E2E_NAMESPACE       namespace of the release, where the Scan resources live
    SECAPI_E2E_IMAGE_REGISTRY  a registry the cluster can pull from that holds the test
                               bed's fixture images (push them with
                               tests.testbed.fixture_images.publish_images); the suite
                               scans REGISTRY/fixtures/alpine:3.17
    SECAPI_E2E_IMAGE           or: any image reference to scan, such as a public image
                               you choose; it wins over SECAPI_E2E_IMAGE_REGISTRY
    SECAPI_E2E_MISSING_IMAGE   an image reference that does not exist (default: the
                               scanned image's repository with a random tag)
    SECAPI_E2E_SCAN_TIMEOUT    seconds a scan may take to end (default 600)
The suite names no registry of its own: with neither SECAPI_E2E_IMAGE nor
SECAPI_E2E_IMAGE_REGISTRY set, the scanning tests fail and say which to set.
Kubectl comes from PATH. Results are checked for form only, since the
cluster's Trivy uses the public vulnerability DB.

On the test bed, when SECAPI_E2E_BASE_URL is not set: a namespace of its own,
`secapi operator --namespace NS` and `secapi serve` on a free loopback port,
each with the token of a ServiceAccount bound to its rules in
deploy/rbac/rules.yaml, and a fresh PostgreSQL database. The suite scans the
bed's fixture images and compares findings with tests/testbed/images/catalog.yaml.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

from secapi.core.executors.kube_client import KubeClient, load_configuration
from tests.operator.conftest import (  # noqa: F401  (crd and database_url are fixtures)
    SECAPI,
    OperatorProcess,
    crd,
    database_url,
    kubectl,
    operator_environment,
    service_account_kubeconfig,
)
from tests.testbed.bed import Testbed
from tests.testbed.fixture_images import load_catalog, reference
from tests.testbed.paths import REPO_ROOT

SCANNED_FIXTURE = "fixtures/alpine:3.17"
MISSING_FIXTURE = "fixtures/not-there:1.0"
E2E_VARIABLES = ("SECAPI_E2E_BASE_URL", "SECAPI_E2E_KUBECONFIG", "SECAPI_E2E_NAMESPACE")


@dataclass(frozen=True)
class Deployment:
    """A running SecAPI in Kubernetes mode: the URL of its API and the namespace of its Scans."""

    base_url: str
    kubeconfig: Path
    namespace: str
    kubectl: str
    on_testbed: bool
    scan_timeout: float

    def kubectl_json(self, *args: str) -> str:
        """Run kubectl against the deployment's cluster and namespace; return its output."""
        result = subprocess.run(
            [self.kubectl, "--kubeconfig", str(self.kubeconfig), "-n", self.namespace, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result.stdout


@dataclass(frozen=True)
class ImageUnderTest:
    """An image to scan and, on the test bed, the vulnerability ids it must yield."""

    reference: str
    expected_ids: set[str] | None


def _installed_deployment() -> Deployment:
    missing = [name for name in E2E_VARIABLES if not os.environ.get(name)]
    if missing:
        pytest.fail(
            f"SECAPI_E2E_BASE_URL is set but {', '.join(missing)} is not; set all of "
            f"{', '.join(E2E_VARIABLES)} (tests/kind/run.sh does), or none to use the test bed",
            pytrace=False,
        )
    kubectl_bin = shutil.which("kubectl")
    if kubectl_bin is None:
        pytest.fail("kubectl is not on PATH; install it to run the end-to-end suite", pytrace=False)
    kubeconfig = Path(os.environ["SECAPI_E2E_KUBECONFIG"])
    if not kubeconfig.is_file():
        pytest.fail(f"SECAPI_E2E_KUBECONFIG names {kubeconfig}, which is no file", pytrace=False)
    base_url = os.environ["SECAPI_E2E_BASE_URL"].rstrip("/")
    try:
        health = httpx.get(f"{base_url}/health", timeout=10)
    except httpx.TransportError as error:
        pytest.fail(
            f"the API at SECAPI_E2E_BASE_URL={base_url} is unreachable ({error}); "
            "check the port-forward to the release's API service",
            pytrace=False,
        )
    if health.status_code != 200:
        pytest.fail(
            f"GET {base_url}/health returned {health.status_code}; check the API pods",
            pytrace=False,
        )
    return Deployment(
        base_url=base_url,
        kubeconfig=kubeconfig,
        namespace=os.environ["SECAPI_E2E_NAMESPACE"],
        kubectl=kubectl_bin,
        on_testbed=False,
        scan_timeout=float(os.environ.get("SECAPI_E2E_SCAN_TIMEOUT", "600")),
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _account_kubeconfigs(
    kubeconfig: Path, namespace: str, out_dir: Path
) -> tuple[Path, Path]:
    admin = KubeClient(load_configuration(str(kubeconfig)))
    try:
        await admin.request(
            "POST",
            "/api/v1/namespaces",
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        )
        configs = []
        for component in ("operator", "api"):
            configs.append(
                await service_account_kubeconfig(
                    admin,
                    namespace=namespace,
                    component=component,
                    kubeconfig=kubeconfig,
                    out=out_dir / f"{component}.kubeconfig",
                )
            )
        return configs[0], configs[1]
    finally:
        admin.close()


def _wait_until_healthy(url: str, process: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"secapi serve exited: {log_file.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"secapi serve did not answer within 60 s: {log_file.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """The deployment under test: the installed one, or operator and API started on the bed."""
    if os.environ.get("SECAPI_E2E_BASE_URL"):
        yield _installed_deployment()
        return

    testbed: Testbed = request.getfixturevalue("testbed")
    admin_kubeconfig: Path = request.getfixturevalue("kubeconfig")
    request.getfixturevalue("crd")
    db_url: str = request.getfixturevalue("database_url")
    work = tmp_path_factory.mktemp("e2e-cluster")
    namespace = f"e2e-{uuid.uuid4().hex[:10]}"
    operator_config, api_config = asyncio.run(
        _account_kubeconfigs(admin_kubeconfig, namespace, work)
    )

    operator = OperatorProcess(
        namespace=namespace,
        env=operator_environment(testbed=testbed, kubeconfig=operator_config, database_url=db_url),
        log_file=work / "operator.log",
    )
    port = _free_port()
    api_log = work / "api.log"
    api_env = operator_environment(
        testbed=testbed,
        kubeconfig=api_config,
        database_url=db_url,
        ENVIRONMENT="development",
        SECRET_KEY="e2e-cluster-" + uuid.uuid4().hex * 2,
        RATE_LIMIT_ENABLED="false",
        SECAPI_EXECUTOR="kubernetes",
        SECAPI_NAMESPACE=namespace,
        SECAPI_DATA_DIR=str(work / "data"),
    )
    log_handle: IO[bytes] = api_log.open("ab")
    api: subprocess.Popen[bytes] | None = None
    try:
        operator.start()
        api = subprocess.Popen(
            [SECAPI, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=api_env,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        base_url = f"http://127.0.0.1:{port}"
        _wait_until_healthy(base_url, api, api_log)
        yield Deployment(
            base_url=base_url,
            kubeconfig=admin_kubeconfig,
            namespace=namespace,
            kubectl=str(Path(testbed.env["SECAPI_TEST_BIN"]) / "kubectl"),
            on_testbed=True,
            scan_timeout=180,
        )
    finally:
        if api is not None:
            _stop(api)
        operator.stop()
        log_handle.close()
        if request.session.testsfailed:
            sys.stderr.write("\n----- operator log -----\n" + operator.log_text()[-10000:])
            sys.stderr.write("\n----- api log -----\n" + api_log.read_text()[-10000:])
        kubectl(testbed, "delete", "namespace", namespace, "--wait=false", check=False)


def _image_settings_missing() -> None:
    pytest.fail(
        "set SECAPI_E2E_IMAGE (an image reference the cluster can pull) or "
        "SECAPI_E2E_IMAGE_REGISTRY (a registry holding the fixture images) to scan on a cluster",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def scan_image(deployment: Deployment) -> ImageUnderTest:
    """The image every completed-scan test scans."""
    if deployment.on_testbed:
        entry = next(item for item in load_catalog() if reference(item) == SCANNED_FIXTURE)
        return ImageUnderTest(
            reference=f"{os.environ['SECAPI_TEST_REGISTRY']}/{SCANNED_FIXTURE}",
            expected_ids={item["id"] for item in entry["expect"]["vulnerabilities"]},
        )
    if os.environ.get("SECAPI_E2E_IMAGE"):
        return ImageUnderTest(reference=os.environ["SECAPI_E2E_IMAGE"], expected_ids=None)
    if os.environ.get("SECAPI_E2E_IMAGE_REGISTRY"):
        registry = os.environ["SECAPI_E2E_IMAGE_REGISTRY"].rstrip("/")
        return ImageUnderTest(reference=f"{registry}/{SCANNED_FIXTURE}", expected_ids=None)
    _image_settings_missing()
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def missing_image(deployment: Deployment, scan_image: ImageUnderTest) -> str:
    """A reference in a reachable registry that names no image."""
    if deployment.on_testbed:
        return f"{os.environ['SECAPI_TEST_REGISTRY']}/{MISSING_FIXTURE}"
    if os.environ.get("SECAPI_E2E_MISSING_IMAGE"):
        return os.environ["SECAPI_E2E_MISSING_IMAGE"]
    repository = scan_image.reference.split("@", 1)[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    return f"{repository}:secapi-e2e-missing-{uuid.uuid4().hex[:8]}"
