"""etcd, kube-apiserver, kube-controller-manager and the fake kubelet of the test bed.

The API server runs the way controller-runtime's envtest runs it, with two
differences that matter for SecAPI: admission stays on (PodSecurity checks the
scan pods), and privileged pods are allowed by the server, so a rejection in a
namespace labelled `restricted` comes from PodSecurity and nothing else.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import ssl
import sys
import urllib.request
from pathlib import Path

from tests.testbed import tools
from tests.testbed.certs import Pki
from tests.testbed.paths import REPO_ROOT, BedPaths
from tests.testbed.processes import LOOPBACK, BedError, free_port, owns_port, spawn, wait_until
from tests.testbed.services import OnStart, Started

NODE_NAME = "secapi-testbed-node"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    # Without it a deleted namespace stays Terminating forever.
    "namespace-controller",
)


def start_etcd(paths: BedPaths, on_start: OnStart, *, timeout: float = 60) -> Started:
    data = paths.data / "etcd"
    shutil.rmtree(data, ignore_errors=True)
    client_port, peer_port = free_port(), free_port()
    client_url = f"http://{LOOPBACK}:{client_port}"
    peer_url = f"http://{LOOPBACK}:{peer_port}"
    record = spawn(
        "etcd",
        [
            str(tools.binary_path("etcd")),
            "--name=testbed",
            f"--data-dir={data}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=testbed={peer_url}",
            # The bed's data is throwaway; fsync only costs time.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
        log=paths.log("etcd"),
    )
    on_start(record)
    wait_until(
        record,
        lambda: etcd_answers(client_url) and owns_port(record, client_port),
        what=f"GET {client_url}/health",
        timeout=timeout,
    )
    return Started(record, client_port, {"url": client_url})


def etcd_answers(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310
        return bool(json.load(response).get("health") == "true")


def admin_ssl_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return context


def apiserver_answers(url: str, pki: Pki) -> bool:
    """Tell whether the API server at `url` reports ready to the admin."""
    context = admin_ssl_context(pki)
    with urllib.request.urlopen(f"{url}/readyz", timeout=5, context=context) as response:  # noqa: S310
        return bool(response.status == 200)


def start_apiserver(
    paths: BedPaths, on_start: OnStart, *, pki: Pki, etcd_url: str, timeout: float = 180
) -> Started:
    port = free_port()
    url = f"https://{LOOPBACK}:{port}"
    record = spawn(
        "kube-apiserver",
        [
            str(tools.binary_path("kube-apiserver")),
            f"--etcd-servers={etcd_url}",
            f"--advertise-address={LOOPBACK}",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={port}",
            f"--cert-dir={paths.data / 'apiserver'}",
            f"--tls-cert-file={pki.server_cert}",
            f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-issuer={url}",
            f"--service-account-key-file={pki.service_account_public_key}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=RBAC",
            # No controller creates the `default` service accounts this plugin requires.
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            # The bed has no real endpoints for the `kubernetes` service.
            "--endpoint-reconciler-type=none",
            # The fake kubelet registers 127.0.0.1 as its InternalIP; log reads go there.
            "--kubelet-preferred-address-types=InternalIP",
            "--profiling=false",
        ],
        log=paths.log("kube-apiserver"),
    )
    on_start(record)
    wait_until(
        record,
        lambda: apiserver_answers(url, pki) and owns_port(record, port),
        what=f"GET {url}/readyz",
        timeout=timeout,
        interval=0.5,
    )
    return Started(record, port, {"url": url})


def _insecure_context() -> ssl.SSLContext:
    # The controller manager serves /healthz with a self-signed certificate it makes itself.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def controller_manager_answers(port: int) -> bool:
    with urllib.request.urlopen(
        f"https://{LOOPBACK}:{port}/healthz", timeout=2, context=_insecure_context()
    ) as response:
        return bool(response.read().strip() == b"ok")


def start_controller_manager(
    paths: BedPaths, on_start: OnStart, *, kubeconfig: Path, timeout: float = 90
) -> Started:
    port = free_port()
    record = spawn(
        "kube-controller-manager",
        [
            str(tools.binary_path("kube-controller-manager")),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            # The API server sets no request-header CA, so looking it up only logs errors.
            "--authentication-skip-lookup=true",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={port}",
            f"--cert-dir={paths.data / 'controller-manager'}",
            f"--controllers={','.join(CONTROLLERS)}",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            "--profiling=false",
        ],
        log=paths.log("kube-controller-manager"),
    )
    on_start(record)
    wait_until(
        record,
        lambda: controller_manager_answers(port) and owns_port(record, port),
        what=f"GET https://{LOOPBACK}:{port}/healthz",
        timeout=timeout,
        interval=0.5,
    )
    return Started(record, port)


def kubelet_available() -> bool:
    """Tell whether the fake kubelet package is in the tree yet."""
    try:
        return importlib.util.find_spec("tests.testbed.kubelet.__main__") is not None
    except ModuleNotFoundError:
        return False


def start_kubelet(
    paths: BedPaths, on_start: OnStart, *, kubeconfig: Path, timeout: float = 60
) -> Started:
    state = paths.kubelet_state
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    port = free_port()
    record = spawn(
        "kubelet",
        [
            sys.executable,
            "-m",
            "tests.testbed.kubelet",
            f"--kubeconfig={kubeconfig}",
            f"--state-dir={state}",
            f"--port={port}",
            f"--node-name={NODE_NAME}",
            f"--env-file={paths.kubelet_env}",
        ],
        log=paths.log("kubelet"),
        cwd=REPO_ROOT,
    )
    on_start(record)
    wait_until(
        record,
        lambda: (state / "ready").exists(),
        what=f"{state / 'ready'} to appear",
        timeout=timeout,
        interval=0.2,
    )
    if not owns_port(record, port):
        raise BedError(
            f"the fake kubelet wrote {state / 'ready'} but does not listen on "
            f"{LOOPBACK}:{port}; see {record.log}"
        )
    return Started(record, port, {"node": NODE_NAME})
