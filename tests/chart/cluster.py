"""Helpers of the chart tests that run against the test bed's API server.

The test bed has a real API server with admission (Pod Security included) and the Job,
garbage collector and namespace controllers. It has no Deployment, ReplicaSet or
StatefulSet controller and no container runtime, because its fake kubelet runs a pod's
command as a local process. So the chart's API, operator and Trivy server never get pods here; what these
tests check is what the API server stores and admits.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.chart.chart import CHART, Tool
from tests.testbed.kubelet import faults

# Components of the chart whose processes must never start on this machine: they are
# servers that listen on 0.0.0.0 inside their containers. The test bed has no controller
# that would create their pods, and these rules keep it so if one is ever added.
SERVER_COMPONENTS = ("api", "operator", "trivy-server", "postgresql", "redis")


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def kubectl_json(kubectl: Tool, *args: str) -> dict[str, Any]:
    completed = kubectl.run(*args, "--output", "json")
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


@contextmanager
def namespace(kubectl: Tool, prefix: str, *, restricted: bool = False) -> Iterator[str]:
    """Create a namespace for one test and delete it afterwards."""
    name = unique_name(prefix)
    manifest: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    if restricted:
        manifest["metadata"]["labels"] = {
            f"pod-security.kubernetes.io/{mode}": "restricted"
            for mode in ("enforce", "warn", "audit")
        }
    kubectl.run("create", "--filename", "-", stdin=json.dumps(manifest))
    try:
        yield name
    finally:
        kubectl.run("delete", "namespace", name, "--wait=false", check=False)


@contextmanager
def servers_never_start(namespace_name: str, release: str) -> Iterator[None]:
    """Make the fake kubelet hold every server pod of a release in ErrImagePull."""
    rule_ids = [
        faults.add_fault(
            "image-pull",
            namespace=namespace_name,
            labels={
                "app.kubernetes.io/instance": release,
                "app.kubernetes.io/component": component,
            },
        )
        for component in SERVER_COMPONENTS
    ]
    try:
        yield
    finally:
        for rule_id in rule_ids:
            faults.remove_fault(rule_id)


def chart_copy_with_crd_change(destination: Path, *, column: str, description: str) -> Path:
    """Copy the chart, symlinks resolved, with one printer column's description changed.

    The copy plays an older chart version whose CRD differs from the repository's.
    """
    chart = destination / "secapi"
    shutil.copytree(CHART, chart, symlinks=False)
    crd_file = next((chart / "files" / "crds").glob("scans*.yaml"))
    crd = yaml.safe_load(crd_file.read_text())
    for version in crd["spec"]["versions"]:
        for printer_column in version.get("additionalPrinterColumns", []):
            if printer_column["name"] == column:
                printer_column["description"] = description
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
    return chart


def printer_column_description(crd: dict[str, Any], column: str) -> str:
    for version in crd["spec"]["versions"]:
        for printer_column in version.get("additionalPrinterColumns", []):
            if printer_column["name"] == column:
                return str(printer_column.get("description", ""))
    raise AssertionError(f"the CRD has no printer column {column!r}")


def wait_for(
    condition: Any, *, timeout: float, interval: float = 0.5, message: str = "condition"
) -> Any:
    """Call `condition` until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)
