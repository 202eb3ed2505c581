"""Per-pod fault switches of the fake kubelet, set by tests.

A test makes the kubelet misbehave for some pods by adding a rule to
`<state dir>/faults.json`, or by putting the annotation
`testbed.secapi.io/fault` on the pod itself. A rule matches a namespace and,
optionally, a subset of pod labels, such as `{"secapi.io/scan": "my-scan"}`.
The kubelet reads the file again whenever it changes and decides the faults of
a pod once, when it first sees the pod, so changing rules never alters a pod
that already runs.

Faults (the annotation takes the same words, comma-separated, each optionally
followed by a number of seconds, for example `"delay-start 3, oom 1"`):

- `truncate-log`: the container runs normally, but the served log keeps only
  the first half of its bytes, so the end of the output is missing.
- `oom`: the process is killed after SECONDS (default 0.5) and the container
  ends as `OOMKilled` with exit code 137, even when it finished sooner.
- `image-pull`: the container never starts; it waits with reason
  `ErrImagePull`, then `ImagePullBackOff`, and the pod stays Pending.
- `vanish`: after SECONDS (default 1) of running, or when the process ends
  sooner, the process is killed and the pod is deleted from the API server
  with no final status.
- `unschedulable`: the pod is never bound; it gets condition
  `PodScheduled=False` with reason `Unschedulable` and stays Pending.
- `hang`: the process runs, but the container is reported running until the
  pod is deleted, whatever the process does.
- `delay-start SECONDS`: the container waits SECONDS (default 5) in
  `ContainerCreating` before its process starts; combines with the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAULTS_FILE = "faults.json"
ANNOTATION = "testbed.secapi.io/fault"

# Seconds a fault waits when its rule or annotation names no number.
DEFAULT_SECONDS = {
    "truncate-log": None,
    "oom": 0.5,
    "image-pull": None,
    "vanish": 1.0,
    "unschedulable": None,
    "hang": None,
    "delay-start": 5.0,
}
KINDS = tuple(DEFAULT_SECONDS)

# When several of these match one pod, only the first in this order applies,
# because each decides how the container ends. The others combine freely.
OUTCOME_PRECEDENCE = ("unschedulable", "image-pull", "vanish", "oom", "hang")


class FaultError(ValueError):
    """A fault rule or annotation is invalid."""


@dataclass(frozen=True)
class Fault:
    """One fault as it applies to a pod."""

    kind: str
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_SECONDS:
            raise FaultError(f"unknown fault {self.kind!r}; use one of: {', '.join(KINDS)}")
        if self.seconds is not None and self.seconds < 0:
            raise FaultError(f"fault {self.kind} got {self.seconds} seconds; use 0 or more")

    @property
    def delay(self) -> float:
        """Seconds the fault waits, its own or the default (0 when it has none)."""
        if self.seconds is not None:
            return self.seconds
        return DEFAULT_SECONDS[self.kind] or 0.0


@dataclass(frozen=True)
class FaultRule:
    """A fault for every pod of `namespace` that carries all of `labels`."""

    namespace: str
    fault: Fault
    labels: Mapping[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def matches(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if namespace != self.namespace:
            return False
        return all(labels.get(key) == value for key, value in self.labels.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "labels": dict(self.labels),
            "fault": self.fault.kind,
            "seconds": self.fault.seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultRule:
        try:
            seconds = data.get("seconds")
            return cls(
                id=str(data["id"]),
                namespace=str(data["namespace"]),
                labels={str(key): str(value) for key, value in (data.get("labels") or {}).items()},
                fault=Fault(str(data["fault"]), None if seconds is None else float(seconds)),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise FaultError(f"invalid fault rule {data!r}: {error}") from error


def parse_annotation(value: str) -> list[Fault]:
    """Parse the annotation's value, such as `"oom"` or `"delay-start 3, hang"`."""
    faults = []
    for item in value.split(","):
        words = item.split()
        if not words:
            continue
        if len(words) > 2:
            raise FaultError(
                f"invalid fault {item.strip()!r}; write a fault name and at most one number"
            )
        seconds = None
        if len(words) == 2:
            try:
                seconds = float(words[1])
            except ValueError as error:
                raise FaultError(
                    f"invalid seconds {words[1]!r} in fault {item.strip()!r}; write a number"
                ) from error
        faults.append(Fault(words[0], seconds))
    return faults


def faults_for_pod(pod: Mapping[str, Any], rules: list[FaultRule]) -> list[Fault]:
    """Return the faults that apply to a pod, from its annotation and the rules.

    Of the faults that decide how a container ends, only the first in
    `OUTCOME_PRECEDENCE` is kept. Raises `FaultError` for an invalid annotation.
    """
    metadata = pod.get("metadata", {})
    labels = metadata.get("labels") or {}
    found = parse_annotation((metadata.get("annotations") or {}).get(ANNOTATION, ""))
    found += [rule.fault for rule in rules if rule.matches(metadata.get("namespace", ""), labels)]

    outcome = next(
        (fault for kind in OUTCOME_PRECEDENCE for fault in found if fault.kind == kind), None
    )
    kept: dict[str, Fault] = {}
    for fault in found:
        if fault.kind in OUTCOME_PRECEDENCE and fault != outcome:
            continue
        kept.setdefault(fault.kind, fault)
    return list(kept.values())


def read_rules(path: Path) -> list[FaultRule]:
    """Read the rules of a faults file; a missing file has none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as error:
        raise FaultError(f"{path} is not valid JSON ({error}); fix or delete it") from error
    return [FaultRule.from_json(item) for item in data.get("rules", [])]


def default_state_dir() -> Path:
    """Return the state folder of the test bed's kubelet (`.testbed/kubelet`)."""
    from tests.testbed.paths import bed_paths

    return bed_paths().kubelet_state


@contextlib.contextmanager
def _locked_rules(state_dir: Path) -> Iterator[list[FaultRule]]:
    """Yield the rules for changing in place, then write them back atomically."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / FAULTS_FILE
    with open(state_dir / (FAULTS_FILE + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rules = read_rules(path)
        yield rules

        # The kubelet may read at any moment, so it must never see half a file.
        temporary = path.with_name(f"{FAULTS_FILE}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"rules": [rule.to_json() for rule in rules]}, indent=2))
        temporary.replace(path)


def add_fault(
    fault: str,
    *,
    namespace: str,
    labels: Mapping[str, str] | None = None,
    seconds: float | None = None,
    state_dir: Path | None = None,
) -> str:
    """Add a rule that gives matching pods a fault, and return the rule's id."""
    rule = FaultRule(namespace=namespace, labels=dict(labels or {}), fault=Fault(fault, seconds))
    with _locked_rules(state_dir or default_state_dir()) as rules:
        rules.append(rule)
    return rule.id


def remove_fault(rule_id: str, *, state_dir: Path | None = None) -> None:
    """Remove one rule; removing a rule that is gone already is not an error."""
    with _locked_rules(state_dir or default_state_dir()) as rules:
        rules[:] = [rule for rule in rules if rule.id != rule_id]


def clear_faults(*, namespace: str | None = None, state_dir: Path | None = None) -> None:
    """Remove every rule, or every rule of one namespace."""
    with _locked_rules(state_dir or default_state_dir()) as rules:
        rules[:] = [rule for rule in rules if namespace is not None and rule.namespace != namespace]


@contextlib.contextmanager
def injected(
    fault: str,
    *,
    namespace: str,
    labels: Mapping[str, str] | None = None,
    seconds: float | None = None,
    state_dir: Path | None = None,
) -> Iterator[str]:
    """Apply a fault rule for the duration of a `with` block; yield its id."""
    rule_id = add_fault(
        fault, namespace=namespace, labels=labels, seconds=seconds, state_dir=state_dir
    )
    try:
        yield rule_id
    finally:
        remove_fault(rule_id, state_dir=state_dir)


class RuleCache:
    """The kubelet's view of a faults file, read again only when the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._rules: list[FaultRule] = []

    def rules(self) -> list[FaultRule]:
        """Return the current rules; raises `FaultError` if the file is invalid."""
        try:
            status = self._path.stat()
            stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._rules = read_rules(self._path) if stamp else []
            self._stamp = stamp
        return self._rules
