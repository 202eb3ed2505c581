"""The test bed's API server admits every object the chart renders, and every scan pod.

`kubectl apply --dry-run=server` sends each object through the API server's schema
validation (unknown fields rejected) and admission without storing it. The namespaces are
labelled with the Pod Security "restricted" profile in enforce, warn and audit mode. A pod
template of a Deployment, StatefulSet or Job that breaks the profile then shows up as a
warning, and a Pod that breaks it is rejected.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from secapi.core.settings import Settings
from secapi.operator.jobs import ScanJobSource, build_job
from tests.chart.chart import CHART, VALUE_FILES, Helm, Tool, config_environment
from tests.chart.cluster import kubectl_json, namespace, wait_for
from tests.testbed.kubelet import faults

pytestmark = pytest.mark.cluster

SETTINGS_VARIABLES = (
    "ENVIRONMENT",
    "DATABASE_URL",
    "REDIS_URL",
    "SECRET_KEY",
    "RATE_LIMIT_ENABLED",
)


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Build Settings from exactly these variables, as the operator's container does."""
    for name in list(os.environ):
        if name.startswith("SECAPI_") or name in SETTINGS_VARIABLES:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_api_server_accepts_rendered_objects(
    helm: Helm, kubectl: Tool, tmp_path: Path, name: str
) -> None:
    with namespace(kubectl, f"chart-dry-run-{name}", restricted=True) as namespace_name:
        completed = helm.run(
            "template",
            "secapi",
            str(CHART),
            "--namespace",
            namespace_name,
            "--values",
            str(VALUE_FILES[name]),
        )
        manifest = tmp_path / "rendered.yaml"
        manifest.write_text(completed.stdout)

        # --force-conflicts: other test sessions co-own fields of the shared CRD.
        applied = kubectl.run(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "--field-manager",
            "chart-test",
            "--filename",
            str(manifest),
        )
        lines = [line for line in applied.stdout.splitlines() if line.strip()]
        rendered_count = completed.stdout.count("\nkind: ") + completed.stdout.startswith("kind: ")
        assert len(lines) == rendered_count, applied.stdout
        assert all("serverside-applied (server dry run)" in line for line in lines), applied.stdout
        assert "PodSecurity" not in applied.stderr, applied.stderr


def scan_job(
    settings: Settings, namespace_name: str, *, registry_secret: str | None
) -> dict[str, Any]:
    source = ScanJobSource(
        name="chart-restricted",
        namespace=namespace_name,
        uid="00000000-0000-4000-8000-00000000c0de",
        generation=1,
        scan_id="00000000-0000-4000-8000-00000000beef",
        image="alpine:3.19",
        timeout_seconds=settings.scanner.timeout_seconds,
        registry_secret=registry_secret,
    )
    job = build_job(source, settings.kubernetes)
    # The uid names no Scan, and the garbage collector would delete a Job whose owner is
    # missing before the test looks at its pod.
    del job["metadata"]["ownerReferences"]
    return job


@pytest.mark.parametrize("name", ["default", "production"])
@pytest.mark.parametrize("registry_secret", [None, "registry-credentials"])
def test_scan_pods_pass_restricted_profile(
    helm: Helm,
    kubectl: Tool,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    registry_secret: str | None,
) -> None:
    with namespace(kubectl, "chart-scan-pods", restricted=True) as namespace_name:
        documents = helm.template(VALUE_FILES[name], namespace=namespace_name)
        env = config_environment(documents, "secapi")
        settings = settings_from({**env, "SECRET_KEY": "k" * 40}, monkeypatch)
        job = scan_job(settings, namespace_name, registry_secret=registry_secret)
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == "secapi-scanner"

        # The Pod Security admission checks a Pod when it is created, so a dry run of the
        # Job's pod rejects a violation with the profile's reasons.
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "scan-pod-dry-run", "namespace": namespace_name},
            "spec": job["spec"]["template"]["spec"],
        }
        dry_run = kubectl.run(
            "create", "--dry-run=server", "--filename", "-", stdin=json.dumps(pod), check=False
        )
        assert dry_run.returncode == 0, dry_run.stderr
        assert "PodSecurity" not in dry_run.stderr

        # Then for real: the Job controller creates the pod, which admission lets through.
        # The kubelet never starts it: the scan would contact the chart's Trivy server,
        # whose name resolves only inside a real cluster.
        labels = {"secapi.io/scan": "chart-restricted"}
        rule = faults.add_fault("unschedulable", namespace=namespace_name, labels=labels)
        try:
            kubectl.run("create", "--filename", "-", stdin=json.dumps(job))
            job_name = job["metadata"]["name"]
            pods = wait_for(
                lambda: kubectl_json(
                    kubectl,
                    "get",
                    "pods",
                    "--namespace",
                    namespace_name,
                    "--selector",
                    f"job-name={job_name}",
                )["items"],
                timeout=60,
                message=f"the Job controller to create the pod of {job_name}",
            )
            assert pods[0]["spec"]["securityContext"]["runAsNonRoot"] is True
        finally:
            faults.remove_fault(rule)


def test_restricted_namespace_rejects_a_weaker_pod(
    helm: Helm, kubectl: Tool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control for the test above: the same namespace rejects the scan pod as soon as
    # one hardening setting is missing, so passing there means something.
    with namespace(kubectl, "chart-scan-pods", restricted=True) as namespace_name:
        documents = helm.template(VALUE_FILES["default"], namespace=namespace_name)
        settings = settings_from(
            {**config_environment(documents, "secapi"), "SECRET_KEY": "k" * 40}, monkeypatch
        )
        spec = copy.deepcopy(
            scan_job(settings, namespace_name, registry_secret=None)["spec"]["template"]["spec"]
        )
        spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "weaker-scan-pod", "namespace": namespace_name},
            "spec": spec,
        }
        rejected = kubectl.run(
            "create", "--dry-run=server", "--filename", "-", stdin=json.dumps(pod), check=False
        )
        assert rejected.returncode != 0
        assert "allowPrivilegeEscalation" in rejected.stderr
