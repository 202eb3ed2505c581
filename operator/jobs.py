"""Build the Job that runs one scan: a pure function from a Scan to a manifest.

Nothing here talks to the API server, so the hardening of the pod (the Pod
Security "restricted" profile), its labels, name and limits are tested
without a cluster.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils import parse_quantity

from secapi.core.executors.scan_resource import (
    API_VERSION,
    GENERATION_LABEL,
    KIND,
    MANAGED_BY_LABEL,
    OPERATOR_MANAGER,
    SCAN_ID_LABEL,
    SCAN_LABEL,
    SCAN_UID_LABEL,
    label_value,
)
from secapi.core.scans.go_runtime import container_memory_limit, go_runtime_environment
from secapi.core.scans.options import ScanOptions
from secapi.core.settings import KubernetesSettings, ScannerSettings
from secapi.operator.report_log import SCAN_SCRIPT, WORK_DIR_VARIABLE

CONTAINER_NAME = "trivy"
MAX_JOB_NAME = 63
# Hex digits of the name's hash suffix: enough that two Scans never collide in practice.
NAME_HASH_LENGTH = 10

# Mount paths inside the scan container. They are distinctive on purpose: the
# test bed kubelet replaces mount paths inside argument strings, so a common
# path such as /scan could also match part of an image reference.
WORK_MOUNT_PATH = "/secapi-work"
DOCKER_CONFIG_MOUNT_PATH = "/secapi-docker"
WORK_VOLUME = "work"
DOCKER_CONFIG_VOLUME = "registry-credentials"
# $0 of the scan script, shown by `ps` and in shell error messages.
SCRIPT_NAME = "secapi-scan"
# UID and GID of the scan process; the scanner image's default user may be root,
# which the restricted profile does not allow.
SCAN_USER_ID = 65532


@dataclass(frozen=True)
class ScanJobSource:
    """Inputs of the Job builder: one generation of a Scan and its scan options."""

    name: str
    namespace: str
    uid: str
    generation: int
    scan_id: str
    image: str
    timeout_seconds: int
    # Trivy flags built from the scan options, without the image and output flags.
    trivy_flags: Sequence[str] = field(default_factory=tuple)
    registry_secret: str | None = None
    # GOGC and GOMEMLIMIT of the scan container (see `job_go_environment`).
    go_environment: Mapping[str, str] = field(default_factory=dict)


def job_go_environment(scanner: ScannerSettings, kubernetes: KubernetesSettings) -> dict[str, str]:
    """Return GOGC and GOMEMLIMIT of a scan container.

    Unless the scanner settings set a memory limit, GOMEMLIMIT is 90 % of the
    container's memory limit, so the garbage collector works harder before the
    kernel would kill the container for using too much memory.
    """
    try:
        limit = int(parse_quantity(kubernetes.memory_limit))
    except ValueError:
        # The API server rejects the Job for the same value, and the scan fails with its message.
        limit = 0
    default = container_memory_limit(limit) if limit > 0 else None
    return go_runtime_environment(scanner, memory_limit_bytes=default)


def job_trivy_flags(
    options: ScanOptions, scanner: ScannerSettings, *, timeout_seconds: int
) -> list[str]:
    """Return the `trivy image` flags of a scan Job, without the image and the output flags.

    The cache folder and the scan cache backend are set through environment
    variables instead (see `_environment`), because flags would override a
    node's own TRIVY_* settings.
    """
    flags = [
        "--scanners",
        ",".join(options.scanners),
        "--severity",
        ",".join(options.severities),
        # Trivy's own limit, so it reports a timeout itself before Kubernetes kills it.
        "--timeout",
        f"{timeout_seconds}s",
        # A scan pod has no container engine socket: read images from the registry.
        "--image-src",
        "remote",
        "--skip-version-check",
        "--disable-telemetry",
        "--no-progress",
    ]
    if options.ignore_unfixed:
        flags.append("--ignore-unfixed")
    if options.platform:
        flags += ["--platform", options.platform]
    if scanner.server_url:
        flags += ["--server", scanner.server_url]
    if scanner.offline:
        flags += ["--skip-db-update", "--skip-java-db-update", "--offline-scan"]
    if scanner.db_repository:
        flags += ["--db-repository", scanner.db_repository]
    if scanner.java_db_repository:
        flags += ["--java-db-repository", scanner.java_db_repository]
    if scanner.insecure_registries:
        flags.append("--insecure")
    return flags


def job_name(*, scan_name: str, scan_uid: str, generation: int) -> str:
    """Return the deterministic name of the Job of one generation of a Scan.

    The name keeps the start of the Scan's name for people reading `kubectl
    get jobs`, and ends with a hash of the Scan's uid and generation, so a new
    generation, or a Scan re-created under the same name, never meets an old
    Job. It is a valid DNS label of at most 63 characters.
    """
    digest = hashlib.sha256(f"{scan_uid}/{generation}".encode()).hexdigest()[:NAME_HASH_LENGTH]
    head = re.sub(r"[^a-z0-9-]", "-", scan_name.lower())
    head = head[: MAX_JOB_NAME - NAME_HASH_LENGTH - 1].strip("-")
    return f"{head}-{digest}" if head else f"scan-{digest}"


def job_labels(source: ScanJobSource) -> dict[str, str]:
    """Return the labels of the Job and its pod."""
    return {
        MANAGED_BY_LABEL: OPERATOR_MANAGER,
        "app.kubernetes.io/name": "secapi",
        "app.kubernetes.io/component": "scan",
        SCAN_LABEL: label_value(source.name),
        SCAN_UID_LABEL: source.uid,
        GENERATION_LABEL: str(source.generation),
        SCAN_ID_LABEL: source.scan_id,
    }


def owner_reference(*, scan_name: str, scan_uid: str) -> dict[str, Any]:
    """Return the owner reference that makes a Scan's deletion remove its Job and pod.

    blockOwnerDeletion stays unset: it would need update rights on scans/finalizers
    where the OwnerReferencesPermissionEnforcement admission plugin is on, and
    nothing waits for Jobs in foreground deletion.
    """
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": scan_name,
        "uid": scan_uid,
        "controller": True,
    }


def _container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": SCAN_USER_ID,
        "runAsGroup": SCAN_USER_ID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _environment(source: ScanJobSource) -> list[dict[str, str]]:
    env = [
        {"name": WORK_DIR_VARIABLE, "value": WORK_MOUNT_PATH},
        # The root filesystem is read-only: everything Trivy writes goes to the emptyDir.
        {"name": "HOME", "value": f"{WORK_MOUNT_PATH}/home"},
        {"name": "TMPDIR", "value": f"{WORK_MOUNT_PATH}/tmp"},  # noqa: S108
        {"name": "TRIVY_CACHE_DIR", "value": f"{WORK_MOUNT_PATH}/cache"},
        # The pod is thrown away after one scan, so a layer cache on disk gains nothing.
        {"name": "TRIVY_CACHE_BACKEND", "value": "memory"},
    ]
    env += [{"name": name, "value": value} for name, value in source.go_environment.items()]
    if source.registry_secret:
        # go-containerregistry, which Trivy uses, reads $DOCKER_CONFIG/config.json.
        env.append({"name": "DOCKER_CONFIG", "value": DOCKER_CONFIG_MOUNT_PATH})
    return env


def _volumes(source: ScanJobSource, settings: KubernetesSettings) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": WORK_VOLUME, "emptyDir": {"sizeLimit": settings.cache_size_limit}}
    ]
    if source.registry_secret:
        volumes.append(
            {
                "name": DOCKER_CONFIG_VOLUME,
                "secret": {
                    "secretName": source.registry_secret,
                    "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                    "defaultMode": 0o440,
                },
            }
        )
    return volumes


def _volume_mounts(source: ScanJobSource) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [{"name": WORK_VOLUME, "mountPath": WORK_MOUNT_PATH}]
    if source.registry_secret:
        mounts.append(
            {"name": DOCKER_CONFIG_VOLUME, "mountPath": DOCKER_CONFIG_MOUNT_PATH, "readOnly": True}
        )
    return mounts


def build_job(source: ScanJobSource, settings: KubernetesSettings) -> dict[str, Any]:
    """Return the Job manifest that scans `source.image` once.

    The pod passes the Pod Security "restricted" profile: non-root, no
    privilege escalation, all capabilities dropped, seccomp RuntimeDefault, a
    read-only root filesystem, and no service account token.
    """
    labels = job_labels(source)
    name = job_name(scan_name=source.name, scan_uid=source.uid, generation=source.generation)

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.scanner_image,
        "imagePullPolicy": settings.scanner_image_pull_policy,
        # The image reference is $1 of the script, and Trivy's flags follow it.
        "command": ["/bin/sh", "-c", SCAN_SCRIPT, SCRIPT_NAME],
        "args": [source.image, *source.trivy_flags],
        "env": _environment(source),
        "volumeMounts": _volume_mounts(source),
        "securityContext": _container_security_context(),
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit},
        },
        "terminationMessagePolicy": "File",
    }

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SCAN_USER_ID,
            "runAsGroup": SCAN_USER_ID,
            "fsGroup": SCAN_USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": _volumes(source, settings),
    }
    if settings.service_account_name:
        pod_spec["serviceAccountName"] = settings.service_account_name
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [dict(toleration) for toleration in settings.tolerations]
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": source.namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(scan_name=source.name, scan_uid=source.uid)],
        },
        "spec": {
            # One attempt: a failed scan is reported with its reason, not retried blindly.
            "backoffLimit": 0,
            "activeDeadlineSeconds": source.timeout_seconds,
            # Only a fallback: the operator deletes the Job once the result is stored.
            "ttlSecondsAfterFinished": settings.job_ttl_seconds,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
