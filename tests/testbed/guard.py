"""The check that keeps cluster tests off every cluster but the test bed's.

Cluster tests create and delete namespaces, CRDs and Jobs. Run against a
developer's real context they would do real damage, so they run only when
KUBECONFIG is the bed's own file and its current context points at the API
server this bed started on 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tests.testbed.paths import BedPaths
from tests.testbed.state import load_state


class ForeignClusterError(RuntimeError):
    """KUBECONFIG is not the test bed's."""


def _current_server(kubeconfig: Path) -> str:
    config = yaml.safe_load(kubeconfig.read_text()) or {}
    context_name = config.get("current-context")
    contexts = {item["name"]: item["context"] for item in config.get("contexts") or []}
    clusters = {item["name"]: item["cluster"] for item in config.get("clusters") or []}
    context = contexts.get(context_name)
    if context is None:
        raise ForeignClusterError(f"{kubeconfig} has no current context named {context_name!r}")
    cluster = clusters.get(context.get("cluster"))
    if cluster is None:
        raise ForeignClusterError(f"{kubeconfig}: context {context_name!r} names no known cluster")
    return str(cluster.get("server", ""))


def check_testbed_kubeconfig(paths: BedPaths) -> Path:
    """Return KUBECONFIG's path if it is the bed's; raise ForeignClusterError otherwise."""
    value = os.environ.get("KUBECONFIG", "")
    fix = "load .testbed/env (the `testbed` fixture does) or run `python -m tests.testbed up`"
    if not value:
        raise ForeignClusterError(f"KUBECONFIG is not set; {fix}")
    if os.pathsep in value:
        raise ForeignClusterError(f"KUBECONFIG lists several files ({value}); {fix}")
    kubeconfig = Path(value).resolve()
    if kubeconfig != paths.kubeconfig:
        raise ForeignClusterError(
            f"KUBECONFIG is {kubeconfig}, not the test bed's {paths.kubeconfig}; {fix}"
        )

    state = load_state(paths)
    expected = state.facts.get("apiserver_url") if state else None
    if not expected:
        raise ForeignClusterError(f"no running test bed is recorded in {paths.state_file}; {fix}")
    server = _current_server(kubeconfig)
    if server != expected:
        raise ForeignClusterError(
            f"{kubeconfig} points at {server}, but the test bed's API server is {expected}; {fix}"
        )
    return kubeconfig
