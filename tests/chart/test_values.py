"""values.yaml and values.schema.json: documented keys, real types, rejected mistakes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.chart.chart import CHART, DEFAULT_VALUES, Helm

VALUES_FILE = CHART / "values.yaml"
SCHEMA_FILE = CHART / "values.schema.json"
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z][A-Za-z0-9]*):")


def _key_lines() -> list[tuple[str, bool, str | None]]:
    """Return (path, documented, parent path) for every key line of values.yaml."""
    keys = []
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in VALUES_FILE.read_text().splitlines():
        match = KEY_LINE.match(line)
        if match:
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            parent = ".".join(key for _, key in stack) or None
            stack.append((indent, match["key"]))
            path = ".".join(key for _, key in stack)
            keys.append((path, previous.strip().startswith("# --"), parent))
        if line.strip():
            previous = line
    return keys


def _schema_node(schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    node = schema
    for key in path.split("."):
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].split("/")[-1]]
        properties = node.get("properties")
        if properties is None:
            return node  # a free-form object (labels, a Kubernetes object): its keys are data
        if key not in properties:
            return None
        node = properties[key]
    return node


def _leaves(values: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(values, dict) and values:
        found = []
        for key, value in values.items():
            found += _leaves(value, f"{path}.{key}" if path else key)
        return found
    return [(path, values)]


def test_every_key_has_a_doc_comment() -> None:
    keys = _key_lines()
    documented = {path for path, has_doc, _ in keys if has_doc}
    children_documented = {parent for path, has_doc, parent in keys if has_doc and parent}

    # A key without its own `# --` line is fine only inside a documented default object
    # (such as the lines of `resources`), whose comment describes the whole value.
    whole_values = documented - children_documented

    def inside_whole_value(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:end]) in whole_values for end in range(1, len(parts)))

    undocumented = [
        path for path, has_doc, _ in keys if not has_doc and not inside_whole_value(path)
    ]
    assert len(keys) > 150
    assert undocumented == []


def test_schema_knows_every_value() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    values = yaml.safe_load(VALUES_FILE.read_text())
    unknown = [path for path, _ in _leaves(values) if _schema_node(schema, path) is None]
    assert unknown == []


def test_schema_closes_every_group() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    open_groups = []
    for path, _, _ in _key_lines():
        node = _schema_node(schema, path)
        if node and node.get("properties") and node.get("additionalProperties") is not False:
            open_groups.append(path)
    assert schema["additionalProperties"] is False
    assert open_groups == []


def test_values_use_real_yaml_types() -> None:
    values = yaml.safe_load(VALUES_FILE.read_text())
    quoted = [
        f"{path}={value!r}"
        for path, value in _leaves(values)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off")
    ]
    comma_lists = [
        f"{path}={value!r}"
        for path, value in _leaves(values)
        if isinstance(value, str) and "," in value
    ]
    assert quoted == []
    assert comma_lists == []


# Each case is a mistake a user makes, with the part of the key path helm must name.
REJECTED = [
    pytest.param({"api": {"replicaCount": "2"}}, "replicaCount", id="number-as-string"),
    pytest.param(
        {"scanner": {"insecureRegistries": "true"}}, "insecureRegistries", id="quoted-bool"
    ),
    pytest.param({"api": {"replicas": 2}}, "replicas", id="unknown-key"),
    pytest.param(
        {"trivyServer": {"persistance": {"enabled": True}}}, "persistance", id="typo-group"
    ),
    pytest.param({"monitoring": {"enabled": True}}, "monitoring", id="unknown-top-level"),
    pytest.param({"environment": "staging"}, "environment", id="bad-enum"),
    pytest.param({"api": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy", id="pull-policy"),
    pytest.param({"trivyServer": {"port": 70000}}, "port", id="port-range"),
    pytest.param({"imagePullSecrets": ["regcred"]}, "imagePullSecrets", id="pull-secret-string"),
    pytest.param({"scanner": {"maxConcurrentScans": 0}}, "maxConcurrentScans", id="zero-scans"),
    pytest.param(
        {"scanner": {"networkPolicy": {"registries": {"cidrs": ["10.0.0.0"]}}}},
        "cidrs",
        id="cidr-without-prefix",
    ),
    pytest.param(
        {"scanner": {"resources": {"limits": {"memory": None}}}}, "memory", id="scan-limit-removed"
    ),
    pytest.param({"api": {"resources": {"requests": {"cpu": "lots"}}}}, "cpu", id="bad-quantity"),
    pytest.param({"scanner": {"tolerations": "workload=scans"}}, "tolerations", id="comma-list"),
]


@pytest.mark.parametrize(("values", "named"), REJECTED)
def test_schema_rejects_mistake(helm: Helm, values: dict[str, Any], named: str) -> None:
    error = helm.template_error(DEFAULT_VALUES, values=values)
    assert "schema" in error
    assert named in error


def test_defaults_alone_ask_for_a_database(helm: Helm) -> None:
    error = helm.template_error()
    assert "database.url" in error
    assert "database.existingSecret" in error
    assert "evaluation.enabled=true" in error


def test_evaluation_refuses_an_external_database(helm: Helm) -> None:
    error = helm.template_error(
        values={"evaluation": {"enabled": True}, "database": {"url": "postgresql://db/secapi"}}
    )
    assert "evaluation.enabled=true" in error
    assert "database.url" in error


def test_short_secret_key_is_rejected_in_production(helm: Helm) -> None:
    error = helm.template_error(DEFAULT_VALUES, values={"secretKey": {"value": "too-short"}})
    assert "secretKey.value is 9 characters long" in error
    assert "openssl rand -hex 32" in error
    # The key itself never appears in the message.
    assert "too-short" not in error


def test_short_secret_key_is_accepted_in_development(helm: Helm) -> None:
    documents = helm.template(
        DEFAULT_VALUES, values={"environment": "development", "secretKey": {"value": "dev-key"}}
    )
    assert any(document["kind"] == "Deployment" for document in documents)
