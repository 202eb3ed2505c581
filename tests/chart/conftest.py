"""Fixtures of the chart tests: helm for rendering, and helm and kubectl for the test bed.

Rendering tests need only the helm binary, which the test bed's tool builder builds from
its Go module. Cluster tests also need the test bed's API server, which the `testbed`
fixture brings up.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chart.chart import Helm, Tool, helm_env
from tests.testbed import tools
from tests.testbed.bed import Testbed


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    tools.ensure_tools(["helm"])
    return tools.binary_path("helm")


@pytest.fixture(scope="session")
def helm(helm_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Helm for `lint` and `template`, with no cluster in reach."""
    home = tmp_path_factory.mktemp("helm-offline")
    return Helm(binary=helm_binary, env=helm_env(home, kubeconfig=None), work_dir=home)


@pytest.fixture(scope="session")
def cluster_helm(
    helm_binary: Path, testbed: Testbed, kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Helm:
    """Helm for `install` and `upgrade` into the test bed."""
    home = tmp_path_factory.mktemp("helm-cluster")
    return Helm(binary=helm_binary, env=helm_env(home, kubeconfig=kubeconfig), work_dir=home)


@pytest.fixture(scope="session")
def kubectl(testbed: Testbed, kubeconfig: Path) -> Tool:
    env = dict(os.environ)
    env["KUBECONFIG"] = str(kubeconfig)
    return Tool(binary=testbed.binary("kubectl"), env=env)
