"""Whether a pod may run on the kubelet's node: the scheduler's filters that matter here.

The bed runs no kube-scheduler, so the kubelet binds pods itself. It checks
what decides placement on a one-node cluster: the node being cordoned, the
pod's `nodeSelector`, its required node affinity and the node's taints.
Resource requests are not checked, so any number of pods fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Taint effects that keep a pod without a matching toleration off a node.
# PreferNoSchedule only steers a real scheduler between nodes.
_BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")


def _matches_expression(requirement: Mapping[str, Any], values: Mapping[str, str]) -> bool:
    key = requirement.get("key", "")
    operator = requirement.get("operator", "")
    wanted = requirement.get("values") or []
    present = key in values
    actual = values.get(key, "")

    if operator == "In":
        return present and actual in wanted
    if operator == "NotIn":
        return not present or actual not in wanted
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    if operator in ("Gt", "Lt"):
        # The API server admits exactly one integer value for these operators.
        try:
            actual_number, wanted_number = int(actual), int(wanted[0])
        except (ValueError, IndexError):
            return False
        return actual_number > wanted_number if operator == "Gt" else actual_number < wanted_number
    return False


def _matches_term(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        # An empty term selects no node, as in kube-scheduler.
        return False
    labels = node["metadata"].get("labels") or {}
    node_fields = {"metadata.name": node["metadata"]["name"]}
    return all(_matches_expression(item, labels) for item in expressions) and all(
        _matches_expression(item, node_fields) for item in fields
    )


def _tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for toleration in tolerations:
        effect = toleration.get("effect", "")
        if effect and effect != taint.get("effect"):
            continue
        key = toleration.get("key", "")
        if toleration.get("operator", "Equal") == "Exists":
            if not key or key == taint.get("key"):
                return True
        elif key == taint.get("key") and toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


def _describe_taint(taint: Mapping[str, Any]) -> str:
    value = taint.get("value")
    return f"{taint.get('key')}{'=' + value if value else ''}:{taint.get('effect')}"


def unschedulable_message(pod: Mapping[str, Any], node: Mapping[str, Any]) -> str | None:
    """Return why `pod` cannot run on `node`, or None when it can.

    The message starts like kube-scheduler's, then names the exact mismatch.
    """
    spec = pod.get("spec", {})
    node_name = node["metadata"]["name"]
    labels = node["metadata"].get("labels") or {}
    prefix = "0/1 nodes are available: 1 node(s)"

    if node.get("spec", {}).get("unschedulable"):
        return f"{prefix} were unschedulable (node {node_name} is cordoned)."

    for key, value in (spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return (
                f"{prefix} didn't match Pod's node affinity/selector "
                f"(nodeSelector {key}={value} does not match node {node_name})."
            )

    required = (
        (spec.get("affinity") or {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution")
    )
    if required is not None:
        terms = required.get("nodeSelectorTerms") or []
        if not any(_matches_term(term, node) for term in terms):
            return (
                f"{prefix} didn't match Pod's node affinity/selector "
                f"(no required node affinity term matches node {node_name})."
            )

    tolerations = spec.get("tolerations") or []
    for taint in node.get("spec", {}).get("taints") or []:
        if taint.get("effect") in _BLOCKING_EFFECTS and not _tolerates(tolerations, taint):
            return (
                f"{prefix} had untolerated taint {{{_describe_taint(taint)}}} (node {node_name})."
            )
    return None
