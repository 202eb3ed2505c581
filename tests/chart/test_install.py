"""`helm install`, `helm upgrade` and `helm uninstall` of the chart into the test bed.

What runs here and what cannot: the API server stores every object, checks it against its
schema and admission (Pod Security included), and Helm runs its hooks against it. No pod
of the API, the operator or the Trivy server runs, because the test bed has no Deployment
or StatefulSet controller and no container runtime for their images (see cluster.py). So
the tests check the objects, the hooks and the CRD's life cycle, not the running service.
Installs use `--no-hooks` except where the hook itself is under test: the migration image
is not available here, so the hook Job cannot succeed.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chart.chart import (
    CHART,
    PRODUCTION_VALUES,
    Helm,
    Tool,
    parse_documents,
)
from tests.chart.cluster import (
    chart_copy_with_crd_change,
    kubectl_json,
    namespace,
    printer_column_description,
    servers_never_start,
    wait_for,
)

pytestmark = pytest.mark.cluster

RELEASE = "secapi"
CRD = "scans.secapi.io"
CHANGED_COLUMN = "Image"
OLD_DESCRIPTION = "Image reference (description of an older chart version)."
# Other test sessions may have applied the shared CRD with kubectl, which makes them
# co-owners of its fields under server-side apply. A cluster where only Helm manages the
# CRD needs neither flag. docs/helm.md explains both to users who adopt a kubectl-applied CRD.
ADOPT_CRD = ("--take-ownership", "--force-conflicts")


def credentials_secret(namespace_name: str) -> dict[str, Any]:
    def encoded(value: str) -> str:
        return base64.b64encode(value.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "secapi-credentials", "namespace": namespace_name},
        "data": {
            # Nothing connects to these: no pod of the release runs here.
            "database-url": encoded("postgresql://secapi@127.0.0.1:1/secapi"),
            "redis-url": encoded("redis://127.0.0.1:1/0"),
            "secret-key": encoded(secrets.token_hex(32)),
        },
    }


def bed_values(namespace_name: str) -> list[str]:
    """Flags that adapt the production-like values to the test bed."""
    return ["--namespace", namespace_name, "--values", str(PRODUCTION_VALUES), "--timeout", "120s"]


class Lifecycle:
    """What the ordered tests below observe of one release, install to uninstall."""

    def __init__(self, namespace_name: str, helm: Helm, kubectl: Tool) -> None:
        self.namespace = namespace_name
        self.helm = helm
        self.kubectl = kubectl

    def manifest_objects(self) -> list[dict[str, Any]]:
        completed = self.helm.run("get", "manifest", RELEASE, "--namespace", self.namespace)
        return parse_documents(completed.stdout)

    def live(self, kind: str, name: str, *, namespaced: bool = True) -> dict[str, Any]:
        scope = ["--namespace", self.namespace] if namespaced else []
        return kubectl_json(self.kubectl, "get", kind, name, *scope)


@pytest.fixture(scope="module")
def lifecycle(
    cluster_helm: Helm, kubectl: Tool, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lifecycle]:
    with namespace(kubectl, "chart-install", restricted=True) as namespace_name:
        kubectl.run(
            "create", "--filename", "-", stdin=json.dumps(credentials_secret(namespace_name))
        )
        with servers_never_start(namespace_name, RELEASE):
            yield Lifecycle(namespace_name, cluster_helm, kubectl)
            cluster_helm.run("uninstall", RELEASE, "--namespace", namespace_name, check=False)


def test_install_creates_every_object(lifecycle: Lifecycle, tmp_path: Path) -> None:
    # Install an "older" chart whose CRD differs, so the upgrade below has a change to apply.
    older = chart_copy_with_crd_change(tmp_path, column=CHANGED_COLUMN, description=OLD_DESCRIPTION)
    lifecycle.helm.run(
        "install", RELEASE, str(older), *bed_values(lifecycle.namespace), "--no-hooks", *ADOPT_CRD
    )

    objects = lifecycle.manifest_objects()
    kinds = sorted({item["kind"] for item in objects})
    assert kinds == [
        "ConfigMap",
        "CustomResourceDefinition",
        "Deployment",
        "Ingress",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    for item in objects:
        namespaced = item["kind"] != "CustomResourceDefinition"
        live = lifecycle.live(item["kind"], item["metadata"]["name"], namespaced=namespaced)
        assert live["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE

    crd = lifecycle.live("customresourcedefinition", CRD, namespaced=False)
    assert printer_column_description(crd, CHANGED_COLUMN) == OLD_DESCRIPTION
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_install_records_the_hooks(lifecycle: Lifecycle) -> None:
    completed = lifecycle.helm.run("get", "hooks", RELEASE, "--namespace", lifecycle.namespace)
    hooks = {
        f"{item['kind']}/{item['metadata']['name']}": item["metadata"]["annotations"][
            "helm.sh/hook"
        ]
        for item in parse_documents(completed.stdout)
    }
    assert hooks == {
        "Job/secapi-migrations": "pre-install,pre-upgrade",
        "Pod/secapi-test-health": "test",
    }


def test_scan_created_before_upgrade(lifecycle: Lifecycle) -> None:
    scan = {
        "apiVersion": "secapi.io/v1alpha1",
        "kind": "Scan",
        "metadata": {"name": "kept-across-upgrades", "namespace": lifecycle.namespace},
        "spec": {"image": "alpine:3.19"},
    }
    wait_for(
        lambda: (
            lifecycle.kubectl.run(
                "create", "--filename", "-", stdin=json.dumps(scan), check=False
            ).returncode
            == 0
        ),
        timeout=30,
        message="the Scan CRD to accept a Scan",
    )
    assert lifecycle.live("scan", "kept-across-upgrades")["spec"]["image"] == "alpine:3.19"


def test_upgrade_applies_values_and_crd_changes(lifecycle: Lifecycle) -> None:
    lifecycle.helm.run(
        "upgrade",
        RELEASE,
        str(CHART),
        *bed_values(lifecycle.namespace),
        "--set",
        "scanner.timeoutSeconds=1200",
        "--no-hooks",
        "--force-conflicts",
    )

    configmap = lifecycle.live("configmap", RELEASE)
    assert configmap["data"]["SECAPI_SCANNER__TIMEOUT_SECONDS"] == "1200"
    crd = lifecycle.live("customresourcedefinition", CRD, namespaced=False)
    assert printer_column_description(crd, CHANGED_COLUMN) != OLD_DESCRIPTION
    status = json.loads(
        lifecycle.helm.run(
            "status", RELEASE, "--namespace", lifecycle.namespace, "--output", "json"
        ).stdout
    )
    assert status["version"] == 2
    assert status["info"]["status"] == "deployed"
    # The Scan lived through the upgrade: the CRD was updated in place, never replaced.
    assert lifecycle.live("scan", "kept-across-upgrades")["spec"]["image"] == "alpine:3.19"


def test_uninstall_keeps_crd_and_scans(lifecycle: Lifecycle) -> None:
    lifecycle.helm.run("uninstall", RELEASE, "--namespace", lifecycle.namespace, "--wait")

    deployments = kubectl_json(
        lifecycle.kubectl, "get", "deployments", "--namespace", lifecycle.namespace
    )
    assert deployments["items"] == []
    crd = lifecycle.live("customresourcedefinition", CRD, namespaced=False)
    assert crd["metadata"]["name"] == CRD
    assert (
        lifecycle.live("scan", "kept-across-upgrades")["metadata"]["name"] == "kept-across-upgrades"
    )


def test_failed_migration_blocks_the_install(cluster_helm: Helm, kubectl: Tool) -> None:
    # The hook Job runs `secapi migrate`, a command this machine does not have, so it fails
    # the way a failing migration does. A pre-install hook that fails must stop the release
    # before any Deployment exists.
    with namespace(kubectl, "chart-migration", restricted=True) as namespace_name:
        completed = cluster_helm.run(
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            namespace_name,
            "--set",
            "database.url=postgresql://secapi@127.0.0.1:1/secapi",
            "--set",
            "migrations.backoffLimit=0",
            "--timeout",
            "120s",
            *ADOPT_CRD,
            check=False,
            timeout=240,
        )
        try:
            assert completed.returncode != 0
            assert "secapi-migrations" in completed.stderr
            assert (
                kubectl_json(kubectl, "get", "deployments", "--namespace", namespace_name)["items"]
                == []
            )

            job = kubectl_json(
                kubectl, "get", "job", "secapi-migrations", "--namespace", namespace_name
            )
            conditions = {
                item["type"]: item["status"] for item in job["status"].get("conditions", [])
            }
            assert conditions.get("Failed") == "True"
            # The hook Secret with the database URL is gone even though the install failed.
            secrets_left = kubectl_json(kubectl, "get", "secrets", "--namespace", namespace_name)
            assert "secapi-migrations" not in [
                item["metadata"]["name"] for item in secrets_left["items"]
            ]
        finally:
            cluster_helm.run("uninstall", RELEASE, "--namespace", namespace_name, check=False)
