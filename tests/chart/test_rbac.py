"""The installed ServiceAccounts have exactly the permissions the operator and the API need.

`kubectl auth can-i --as system:serviceaccount:...` queries the test bed's RBAC authorizer,
so these checks see the Roles and bindings as the API server applies them. Two kinds of
check: the whole list of each account equals deploy/rbac/rules.yaml (the chart grants no
more and no less than that file), and single questions that pin down what each component
must and must not be able to do, whatever the file says.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import yaml

from tests.chart.chart import CHART, Helm, Tool
from tests.chart.cluster import namespace, servers_never_start

pytestmark = pytest.mark.cluster

RELEASE = "secapi"
RULES_FILE = CHART / "files" / "rbac" / "rules.yaml"
ADOPT_CRD = ("--take-ownership", "--force-conflicts")
# An account that nothing is bound to: what it may do, every account of the cluster may do
# (asking about its own permissions, reading ClusterTrustBundles, discovery URLs).
UNBOUND_ACCOUNT = "chart-test-unbound"
LIST_ROW = re.compile(
    r"^(?P<resource>\S*)\s+\[(?P<urls>[^\]]*)\]\s+\[(?P<names>[^\]]*)\]\s+\[(?P<verbs>[^\]]*)\]$"
)

OPERATOR_MUST = [
    ("get", "scans.secapi.io"),
    ("list", "scans.secapi.io"),
    ("watch", "scans.secapi.io"),
    ("delete", "scans.secapi.io"),
    ("patch", "scans.secapi.io", "status"),
    ("create", "jobs.batch"),
    ("get", "jobs.batch"),
    ("list", "jobs.batch"),
    ("watch", "jobs.batch"),
    ("delete", "jobs.batch"),
    ("get", "pods"),
    ("list", "pods"),
    ("watch", "pods"),
    ("get", "pods", "log"),
    ("create", "events"),
    ("patch", "events"),
]
OPERATOR_MUST_NOT = [
    # The operator writes only the status. The spec belongs to the client that applied the Scan.
    ("patch", "scans.secapi.io"),
    ("update", "scans.secapi.io"),
    ("get", "secrets"),
    ("list", "secrets"),
    ("create", "pods"),
    ("create", "pods", "exec"),
    ("update", "configmaps"),
    ("create", "scans.secapi.io"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("create", "serviceaccounts", "token"),
]
API_MUST = [
    ("create", "scans.secapi.io"),
    ("get", "scans.secapi.io"),
    ("list", "scans.secapi.io"),
    ("delete", "scans.secapi.io"),
]
API_MUST_NOT = [
    ("patch", "scans.secapi.io", "status"),
    ("create", "jobs.batch"),
    ("get", "pods"),
    ("get", "pods", "log"),
    ("get", "secrets"),
    ("list", "secrets"),
]
SCANNER_MUST_NOT = [
    ("get", "scans.secapi.io"),
    ("get", "pods"),
    ("get", "secrets"),
    ("create", "jobs.batch"),
    ("list", "configmaps"),
]


def account(namespace_name: str, name: str) -> str:
    if name == UNBOUND_ACCOUNT:
        return f"system:serviceaccount:{namespace_name}:{name}"
    return f"system:serviceaccount:{namespace_name}:{RELEASE}-{name}"


def can_i(
    kubectl: Tool, user: str, namespace_name: str, verb: str, resource: str, subresource: str = ""
) -> bool:
    args = ["auth", "can-i", verb, resource, "--as", user, "--namespace", namespace_name]
    if subresource:
        args += ["--subresource", subresource]
    completed = kubectl.run(*args, check=False)
    answer = completed.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {answer} {completed.stderr}"
    return answer == "yes"


def listed(kubectl: Tool, user: str, namespace_name: str) -> dict[str, set[str]]:
    """Return resource -> verbs of `kubectl auth can-i --list`, resources only."""
    completed = kubectl.run("auth", "can-i", "--list", "--as", user, "--namespace", namespace_name)
    found: dict[str, set[str]] = {}
    for line in completed.stdout.splitlines()[1:]:
        match = LIST_ROW.match(line.rstrip())
        assert match, f"unexpected line of kubectl auth can-i --list: {line!r}"
        if match["resource"]:
            found.setdefault(match["resource"], set()).update(match["verbs"].split())
    return found


def granted(kubectl: Tool, user: str, namespace_name: str) -> dict[str, set[str]]:
    """Return resource -> verbs the account has beyond what every account has."""
    baseline = listed(kubectl, account(namespace_name, UNBOUND_ACCOUNT), namespace_name)
    found = {}
    for resource, verbs in listed(kubectl, user, namespace_name).items():
        extra = verbs - baseline.get(resource, set())
        if extra:
            found[resource] = extra
    return found


def expected_from(rules: list[dict[str, object]]) -> dict[str, set[str]]:
    """Return resource -> verbs in the notation of `can-i --list` (`jobs.batch`, `scans.secapi.io/status`)."""
    expected: dict[str, set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:  # type: ignore[attr-defined]
            for resource in rule["resources"]:  # type: ignore[attr-defined]
                name, _, subresource = str(resource).partition("/")
                key = f"{name}.{group}" if group else name
                if subresource:
                    key = f"{key}/{subresource}"
                expected.setdefault(key, set()).update(rule["verbs"])  # type: ignore[arg-type]
    return expected


@pytest.fixture(scope="module")
def installed(cluster_helm: Helm, kubectl: Tool) -> Iterator[str]:
    with namespace(kubectl, "chart-rbac") as namespace_name:
        with servers_never_start(namespace_name, RELEASE):
            cluster_helm.run(
                "install",
                RELEASE,
                str(CHART),
                "--namespace",
                namespace_name,
                "--set",
                "database.url=postgresql://secapi@127.0.0.1:1/secapi",
                "--no-hooks",
                *ADOPT_CRD,
            )
            try:
                yield namespace_name
            finally:
                cluster_helm.run("uninstall", RELEASE, "--namespace", namespace_name, check=False)


def test_operator_has_exactly_the_rules_file(installed: str, kubectl: Tool) -> None:
    rules = yaml.safe_load(RULES_FILE.read_text())
    assert not rules["operator"].get("cluster"), "cluster rules need a check of their own here"
    assert granted(kubectl, account(installed, "operator"), installed) == expected_from(
        rules["operator"]["namespaced"]
    )


def test_api_has_exactly_the_rules_file(installed: str, kubectl: Tool) -> None:
    rules = yaml.safe_load(RULES_FILE.read_text())
    assert granted(kubectl, account(installed, "api"), installed) == expected_from(
        rules["api"]["namespaced"]
    )


def test_scanner_has_no_permissions(installed: str, kubectl: Tool) -> None:
    assert granted(kubectl, account(installed, "scanner"), installed) == {}
    for check in SCANNER_MUST_NOT:
        assert not can_i(kubectl, account(installed, "scanner"), installed, *check), check


@pytest.mark.parametrize("check", OPERATOR_MUST, ids=" ".join)
def test_operator_may(installed: str, kubectl: Tool, check: tuple[str, ...]) -> None:
    assert can_i(kubectl, account(installed, "operator"), installed, *check)


@pytest.mark.parametrize("check", OPERATOR_MUST_NOT, ids=" ".join)
def test_operator_may_not(installed: str, kubectl: Tool, check: tuple[str, ...]) -> None:
    assert not can_i(kubectl, account(installed, "operator"), installed, *check)


@pytest.mark.parametrize("check", API_MUST, ids=" ".join)
def test_api_may(installed: str, kubectl: Tool, check: tuple[str, ...]) -> None:
    assert can_i(kubectl, account(installed, "api"), installed, *check)


@pytest.mark.parametrize("check", API_MUST_NOT, ids=" ".join)
def test_api_may_not(installed: str, kubectl: Tool, check: tuple[str, ...]) -> None:
    assert not can_i(kubectl, account(installed, "api"), installed, *check)


@pytest.mark.parametrize("component", ["operator", "api"])
def test_permissions_end_at_the_namespace(installed: str, kubectl: Tool, component: str) -> None:
    for other in ("default", "kube-system"):
        assert not can_i(kubectl, account(installed, component), other, "list", "scans.secapi.io")
        assert not can_i(kubectl, account(installed, component), other, "create", "jobs.batch")
    listed = kubectl.run(
        "auth", "can-i", "--list", "--as", account(installed, component), "--namespace", "default"
    )
    assert "secapi.io" not in listed.stdout
