"""The pure Job builder: names, labels, ownership and the hardening of the scan pod."""

from __future__ import annotations

import re

import pytest

from secapi.core.executors.scan_resource import (
    GENERATION_LABEL,
    MANAGED_BY_LABEL,
    SCAN_ID_LABEL,
    SCAN_LABEL,
    SCAN_UID_LABEL,
    label_value,
)
from secapi.core.settings import KubernetesSettings, ScannerSettings
from secapi.operator.jobs import (
    DOCKER_CONFIG_MOUNT_PATH,
    SCRIPT_NAME,
    WORK_MOUNT_PATH,
    ScanJobSource,
    build_job,
    job_go_environment,
    job_name,
)
from secapi.operator.report_log import SCAN_SCRIPT

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
UID = "6f1c2a9e-4b7d-4a53-9a4e-0d2f0b8f6c11"


def make_source(**changes: object) -> ScanJobSource:
    values: dict[str, object] = {
        "name": "nginx-latest",
        "namespace": "team-a",
        "uid": UID,
        "generation": 1,
        "scan_id": "0b7e5d0c-1d6a-4c0a-9f3e-2a6f1f9d8e77",
        "image": "127.0.0.1:5000/nginx:1.25",
        "timeout_seconds": 600,
        "trivy_flags": ("--scanners", "vuln,secret"),
    }
    values.update(changes)
    return ScanJobSource(**values)  # type: ignore[arg-type]


def pod_spec(job: dict[str, object]) -> dict[str, object]:
    return job["spec"]["template"]["spec"]  # type: ignore[index, no-any-return]


def test_job_name_is_deterministic() -> None:
    first = job_name(scan_name="nginx-latest", scan_uid=UID, generation=1)
    assert first == job_name(scan_name="nginx-latest", scan_uid=UID, generation=1)
    assert first.startswith("nginx-latest-")


def test_job_name_differs_per_generation_and_uid() -> None:
    names = {
        job_name(scan_name="app", scan_uid=UID, generation=1),
        job_name(scan_name="app", scan_uid=UID, generation=2),
        job_name(scan_name="app", scan_uid=UID.replace("6f", "7f"), generation=1),
    }
    assert len(names) == 3


@pytest.mark.parametrize(
    "scan_name",
    ["a", "x" * 253, "with.dots.in.it", "a" + "-" * 80 + "b", "UPPER-lower", "1234567890" * 7],
)
def test_job_name_is_a_dns_label(scan_name: str) -> None:
    name = job_name(scan_name=scan_name, scan_uid=UID, generation=12345)
    assert len(name) <= 63
    assert DNS_LABEL.match(name), name


def test_label_value_shortens_long_names() -> None:
    long_name = "a." * 100 + "z"
    value = label_value(long_name)
    assert len(value) <= 63
    assert re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", value)
    assert value == label_value(long_name)
    assert label_value("short-name") == "short-name"


def test_job_labels_and_owner() -> None:
    job = build_job(make_source(generation=3), KubernetesSettings())
    labels = job["metadata"]["labels"]

    assert labels[MANAGED_BY_LABEL] == "secapi-operator"
    assert labels[SCAN_LABEL] == "nginx-latest"
    assert labels[SCAN_UID_LABEL] == UID
    assert labels[GENERATION_LABEL] == "3"
    assert labels[SCAN_ID_LABEL] == "0b7e5d0c-1d6a-4c0a-9f3e-2a6f1f9d8e77"
    assert job["spec"]["template"]["metadata"]["labels"] == labels

    [owner] = job["metadata"]["ownerReferences"]
    assert owner["apiVersion"] == "secapi.io/v1alpha1"
    assert owner["kind"] == "Scan"
    assert owner["uid"] == UID
    assert owner["name"] == "nginx-latest"
    assert owner["controller"] is True


def test_job_runs_once_with_deadline() -> None:
    settings = KubernetesSettings(job_ttl_seconds=7200)
    job = build_job(make_source(timeout_seconds=900), settings)

    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 900
    assert job["spec"]["ttlSecondsAfterFinished"] == 7200
    assert pod_spec(job)["restartPolicy"] == "Never"


def test_pod_meets_restricted_profile() -> None:
    spec = pod_spec(build_job(make_source(registry_secret="pull-secret"), KubernetesSettings()))
    [container] = spec["containers"]  # type: ignore[misc]
    context = container["securityContext"]

    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True  # type: ignore[index]
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}  # type: ignore[index]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] > 0
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    # The restricted profile allows only these volume types.
    for volume in spec["volumes"]:  # type: ignore[attr-defined]
        kinds = set(volume) - {"name"}
        assert kinds <= {"emptyDir", "secret", "configMap", "projected", "downwardAPI"}, volume


def test_container_resources_come_from_settings() -> None:
    settings = KubernetesSettings(
        cpu_request="250m", cpu_limit="2", memory_request="512Mi", memory_limit="3Gi"
    )
    [container] = pod_spec(build_job(make_source(), settings))["containers"]  # type: ignore[misc]
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"cpu": "2", "memory": "3Gi"},
    }


def test_image_is_an_argument_not_script_text() -> None:
    image = "127.0.0.1:5000/app:1.0"
    [container] = pod_spec(build_job(make_source(image=image), KubernetesSettings()))["containers"]  # type: ignore[misc]

    assert container["command"] == ["/bin/sh", "-c", SCAN_SCRIPT, SCRIPT_NAME]
    assert container["args"] == [image, "--scanners", "vuln,secret"]
    assert image not in SCAN_SCRIPT


def test_writable_paths_are_under_the_empty_dir() -> None:
    [container] = pod_spec(build_job(make_source(), KubernetesSettings()))["containers"]  # type: ignore[misc]
    env = {item["name"]: item["value"] for item in container["env"]}

    for name in ("SECAPI_WORK_DIR", "HOME", "TMPDIR", "TRIVY_CACHE_DIR"):
        assert env[name].startswith(WORK_MOUNT_PATH), name
    assert container["volumeMounts"] == [{"name": "work", "mountPath": WORK_MOUNT_PATH}]


def test_registry_secret_is_mounted_as_docker_config() -> None:
    spec = pod_spec(build_job(make_source(registry_secret="pull-secret"), KubernetesSettings()))
    [container] = spec["containers"]  # type: ignore[misc]
    env = {item["name"]: item["value"] for item in container["env"]}
    secret_volume = next(volume for volume in spec["volumes"] if "secret" in volume)  # type: ignore[attr-defined]

    assert env["DOCKER_CONFIG"] == DOCKER_CONFIG_MOUNT_PATH
    assert secret_volume["secret"]["secretName"] == "pull-secret"
    assert secret_volume["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == DOCKER_CONFIG_MOUNT_PATH)
    assert mount["readOnly"] is True


def test_no_registry_secret_means_no_docker_config() -> None:
    spec = pod_spec(build_job(make_source(), KubernetesSettings()))
    [container] = spec["containers"]  # type: ignore[misc]
    assert all(item["name"] != "DOCKER_CONFIG" for item in container["env"])
    assert all("secret" not in volume for volume in spec["volumes"])  # type: ignore[attr-defined]


def test_placement_settings_reach_the_pod() -> None:
    settings = KubernetesSettings(
        node_selector={"pool": "scanners"},
        tolerations=[{"key": "scanners", "operator": "Exists", "effect": "NoSchedule"}],
        priority_class_name="low",
        service_account_name="secapi-scan",
    )
    spec = pod_spec(build_job(make_source(), settings))

    assert spec["nodeSelector"] == {"pool": "scanners"}
    assert spec["tolerations"] == [
        {"key": "scanners", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert spec["priorityClassName"] == "low"
    assert spec["serviceAccountName"] == "secapi-scan"


def test_trivy_flags_follow_options() -> None:
    from secapi.core.scans.options import ScanOptions
    from secapi.core.settings import ScannerSettings
    from secapi.operator.jobs import job_trivy_flags

    options = ScanOptions(
        scanners=["vuln"],
        severities=["HIGH", "CRITICAL"],
        ignore_unfixed=True,
        platform="linux/arm64",
    )
    scanner = ScannerSettings(
        offline=True,
        insecure_registries=True,
        server_url="http://trivy:4954",
        db_repository="mirror/db",
    )
    flags = job_trivy_flags(options, scanner, timeout_seconds=300)

    assert flags[flags.index("--scanners") + 1] == "vuln"
    assert flags[flags.index("--severity") + 1] == "HIGH,CRITICAL"
    assert flags[flags.index("--timeout") + 1] == "300s"
    assert flags[flags.index("--platform") + 1] == "linux/arm64"
    assert flags[flags.index("--server") + 1] == "http://trivy:4954"
    assert flags[flags.index("--db-repository") + 1] == "mirror/db"
    assert "--ignore-unfixed" in flags
    assert "--skip-db-update" in flags
    assert "--insecure" in flags
    # The cache folder is an environment variable, so a node's TRIVY_CACHE_DIR can win.
    assert "--cache-dir" not in flags


def test_default_trivy_flags_stay_online() -> None:
    from secapi.core.scans.options import ScanOptions
    from secapi.core.settings import ScannerSettings
    from secapi.operator.jobs import job_trivy_flags

    flags = job_trivy_flags(ScanOptions(), ScannerSettings(), timeout_seconds=600)

    assert flags[flags.index("--scanners") + 1] == "vuln,secret"
    assert "--skip-db-update" not in flags
    assert "--server" not in flags
    assert "--insecure" not in flags
    assert "--ignore-unfixed" not in flags


def test_go_settings_reach_the_container() -> None:
    go_environment = job_go_environment(ScannerSettings(), KubernetesSettings(memory_limit="1Gi"))
    job = build_job(make_source(go_environment=go_environment), KubernetesSettings())
    [container] = pod_spec(job)["containers"]  # type: ignore[misc]
    env = {item["name"]: item["value"] for item in container["env"]}

    assert env["GOGC"] == "400"
    # 90 % of 1 GiB, so the collector works harder before the kernel kills the container.
    assert env["GOMEMLIMIT"] == str(int(0.9 * 1024**3))


@pytest.mark.parametrize(
    ("scanner", "expected"),
    [
        ({"go_memory_limit_bytes": 512 * 1024**2}, {"GOGC": "400", "GOMEMLIMIT": "536870912"}),
        ({"go_gc_percent": None}, {"GOMEMLIMIT": str(int(0.9 * 2 * 1024**3))}),
        ({"go_gc_percent": 150}, {"GOGC": "150", "GOMEMLIMIT": str(int(0.9 * 2 * 1024**3))}),
    ],
)
def test_go_settings_follow_scanner_settings(
    scanner: dict[str, object], expected: dict[str, str]
) -> None:
    settings = ScannerSettings(**scanner)  # type: ignore[arg-type]
    assert job_go_environment(settings, KubernetesSettings(memory_limit="2Gi")) == expected


def test_unparseable_memory_limit_leaves_gomemlimit_out() -> None:
    environment = job_go_environment(ScannerSettings(), KubernetesSettings(memory_limit="lots"))
    assert environment == {"GOGC": "400"}
