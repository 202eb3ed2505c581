"""Run the test bed's helm and kubectl against the SecAPI chart and read what they render.

Every helm call gets its own configuration folders (HELM_*_HOME) inside the test's temporary
folder, so the tests never read or write the user's Helm repositories. `helm template` runs
with KUBECONFIG pointing at a file that does not exist, so rendering never reaches a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.paths import REPO_ROOT

CHART = REPO_ROOT / "charts" / "secapi"
CI_VALUES = CHART / "ci"
DEFAULT_VALUES = CI_VALUES / "default-values.yaml"
EVALUATION_VALUES = CI_VALUES / "evaluation-values.yaml"
PRODUCTION_VALUES = CI_VALUES / "production-values.yaml"
VALUE_FILES = {
    "default": DEFAULT_VALUES,
    "evaluation": EVALUATION_VALUES,
    "production": PRODUCTION_VALUES,
}
RELEASE = "secapi"
NAMESPACE = "secapi-chart"


class CommandFailed(AssertionError):
    """A helm or kubectl command ended with a non-zero status."""


@dataclass(frozen=True)
class Tool:
    """One command-line tool with a fixed environment."""

    binary: Path
    env: Mapping[str, str]

    def run(
        self,
        *args: str,
        check: bool = True,
        stdin: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        completed = subprocess.run(
            [str(self.binary), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=dict(self.env),
            timeout=timeout,
            check=False,
        )
        if check and completed.returncode != 0:
            raise CommandFailed(
                f"{self.binary.name} {' '.join(args)} exited with {completed.returncode}:\n"
                f"{completed.stderr.strip()}\n{completed.stdout.strip()[-4000:]}"
            )
        return completed


def helm_env(home: Path, *, kubeconfig: Path | None) -> dict[str, str]:
    """Return the environment of helm: private config folders and the given kubeconfig."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HELM_")}
    for name in ("CACHE", "CONFIG", "DATA"):
        folder = home / name.lower()
        folder.mkdir(parents=True, exist_ok=True)
        env[f"HELM_{name}_HOME"] = str(folder)
    env["KUBECONFIG"] = str(kubeconfig) if kubeconfig else str(home / "no-cluster.kubeconfig")
    return env


def parse_documents(text: str) -> list[dict[str, Any]]:
    """Parse a multi-document YAML stream, dropping empty documents."""
    return [document for document in yaml.safe_load_all(text) if document]


@dataclass(frozen=True)
class Helm(Tool):
    """The test bed's helm with a private configuration; values files go to `work_dir`."""

    work_dir: Path

    def template(
        self,
        *value_files: Path,
        values: Mapping[str, Any] | None = None,
        release: str = RELEASE,
        namespace: str = NAMESPACE,
        extra: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Render the chart and return its objects, hooks and test pods included."""
        completed = self.run(*self.template_args(value_files, values, release, namespace, extra))
        return parse_documents(completed.stdout)

    def template_error(
        self,
        *value_files: Path,
        values: Mapping[str, Any] | None = None,
        release: str = RELEASE,
        namespace: str = NAMESPACE,
    ) -> str:
        """Render the chart expecting failure; return helm's error output."""
        completed = self.run(
            *self.template_args(value_files, values, release, namespace, ()), check=False
        )
        assert completed.returncode != 0, (
            f"helm template succeeded, but it should have rejected {values!r}"
        )
        return completed.stderr

    def template_args(
        self,
        value_files: Iterable[Path],
        values: Mapping[str, Any] | None,
        release: str,
        namespace: str,
        extra: Sequence[str],
    ) -> list[str]:
        args = ["template", release, str(CHART), "--namespace", namespace]
        for path in value_files:
            args += ["--values", str(path)]
        if values:
            args += ["--values", str(self.write_values(values))]
        return [*args, *extra]

    def write_values(self, values: Mapping[str, Any]) -> Path:
        """Write values to a file and return its path.

        Values files keep YAML types exactly, where `--set` would turn "1.0" into a number.
        """
        path = self.work_dir / f"values-{uuid.uuid4().hex[:12]}.yaml"
        path.write_text(yaml.safe_dump(dict(values)))
        return path


def find(documents: Iterable[Mapping[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """Return the one rendered object of a kind and name."""
    matches = [
        dict(document)
        for document in documents
        if document.get("kind") == kind and document.get("metadata", {}).get("name") == name
    ]
    names = sorted(
        f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
        for document in documents
    )
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)} among {names}"
    return matches[0]


def of_kind(documents: Iterable[Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [dict(document) for document in documents if document.get("kind") == kind]


def pod_specs(documents: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return every pod spec the chart renders, keyed by `Kind/name`."""
    specs = {}
    for document in documents:
        kind = document.get("kind")
        name = f"{kind}/{document['metadata']['name']}"
        if kind in ("Deployment", "StatefulSet", "Job"):
            specs[name] = document["spec"]["template"]["spec"]
        elif kind == "Pod":
            specs[name] = document["spec"]
    return specs


def config_environment(documents: Iterable[Mapping[str, Any]], fullname: str) -> dict[str, str]:
    """Return the ConfigMap's data, the environment the API and the operator start with."""
    configmap = find(documents, "ConfigMap", fullname)
    return {key: str(value) for key, value in configmap["data"].items()}


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
