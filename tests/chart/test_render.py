"""What `helm lint` and `helm template` produce with default, evaluation and production values.

These tests need only the helm binary. test_admission.py and test_install.py send the same
objects to the test bed's API server.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from secapi.core.settings import Settings
from secapi.operator.jobs import ScanJobSource, build_job
from tests.chart.chart import (
    CHART,
    DEFAULT_VALUES,
    EVALUATION_VALUES,
    PRODUCTION_VALUES,
    RELEASE,
    VALUE_FILES,
    Helm,
    config_environment,
    find,
    of_kind,
    pod_specs,
)
from tests.testbed.paths import REPO_ROOT

FULLNAME = "secapi"
SETTINGS_VARIABLES = (
    "ENVIRONMENT",
    "DATABASE_URL",
    "REDIS_URL",
    "SECRET_KEY",
    "RATE_LIMIT_ENABLED",
)


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Build Settings the way a container does: from exactly these environment variables."""
    import os

    for name in list(os.environ):
        if name.startswith("SECAPI_") or name in SETTINGS_VARIABLES:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def scan_pod(settings: Settings, namespace: str = "secapi-chart") -> dict[str, Any]:
    source = ScanJobSource(
        name="render-test",
        namespace=namespace,
        uid="00000000-0000-4000-8000-000000000001",
        generation=1,
        scan_id="00000000-0000-4000-8000-000000000002",
        image="alpine:3.19",
        timeout_seconds=600,
    )
    return build_job(source, settings.kubernetes)["spec"]["template"]


@pytest.fixture(scope="module", params=sorted(VALUE_FILES))
def rendered(request: pytest.FixtureRequest, helm: Helm) -> tuple[str, list[dict[str, Any]]]:
    return request.param, helm.template(VALUE_FILES[request.param])


@pytest.mark.parametrize("name", sorted(VALUE_FILES))
def test_lint_strict_passes(helm: Helm, name: str) -> None:
    completed = helm.run("lint", "--strict", str(CHART), "--values", str(VALUE_FILES[name]))
    assert "1 chart(s) linted, 0 chart(s) failed" in completed.stdout


def test_lint_strict_passes_with_bare_defaults(helm: Helm) -> None:
    # Lint mode turns `fail` into a log line, so the chart's own defaults lint cleanly even
    # though an install needs a database (test_values.py checks that message).
    completed = helm.run("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in completed.stdout


def test_every_pod_is_restricted(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, documents = rendered
    specs = pod_specs(documents)
    assert len(specs) >= 4, f"{name}: expected the API, operator, Trivy server, migration pods"
    for owner, spec in specs.items():
        pod_context = spec.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True, owner
        assert pod_context.get("seccompProfile") == {"type": "RuntimeDefault"}, owner
        assert not spec.get("hostNetwork"), owner
        assert not spec.get("hostPID"), owner
        assert all("hostPath" not in volume for volume in spec.get("volumes", [])), owner
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{owner} container {container['name']}"
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("privileged"), where
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where
            assert not container["image"].endswith(":latest"), where


def test_service_account_tokens_only_where_needed(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, documents = rendered
    mounted = {
        owner
        for owner, spec in pod_specs(documents).items()
        if spec.get("automountServiceAccountToken") is not False
    }
    assert mounted == {f"Deployment/{FULLNAME}-api", f"Deployment/{FULLNAME}-operator"}
    for account in of_kind(documents, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_api_probes_health_and_ready(helm: Helm) -> None:
    documents = helm.template(DEFAULT_VALUES)
    container = find(documents, "Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # Inside the container, all interfaces are the pod's own; nothing here binds it.
    assert container["args"][:3] == ["serve", "--host", "0.0.0.0"]  # noqa: S104
    # The hook migrates; replicas starting at once must not race to do the same.
    assert "--no-migrate" in container["args"]


def test_operator_runs_one_replica_with_liveness(helm: Helm) -> None:
    documents = helm.template(DEFAULT_VALUES)
    deployment = find(documents, "Deployment", f"{FULLNAME}-operator")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container["args"][:3] == ["operator", "--namespace", "secapi-chart"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


@pytest.mark.parametrize(
    ("values_file", "events"),
    [(DEFAULT_VALUES, "pre-install,pre-upgrade"), (EVALUATION_VALUES, "post-install,pre-upgrade")],
)
def test_migrations_run_as_hook(helm: Helm, values_file: Path, events: str) -> None:
    documents = helm.template(values_file)
    job = find(documents, "Job", f"{FULLNAME}-migrations")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == events
    # In evaluation mode the database starts with the release, so the Job retries longer.
    assert job["spec"]["backoffLimit"] == (5 if values_file == EVALUATION_VALUES else 3)
    assert container["command"] + container["args"] == ["secapi", "migrate"]
    # The migration gets the database URL and nothing else secret.
    secret_names = {
        item["name"] for item in container["env"] if "secretKeyRef" in item.get("valueFrom", {})
    }
    assert "SECRET_KEY" not in secret_names
    assert "REDIS_URL" not in secret_names
    assert "DATABASE_URL" in env_of(container)


def test_migration_url_from_hook_secret(helm: Helm) -> None:
    url = "postgresql://secapi:s3cret@db.example.internal:5432/secapi"
    documents = helm.template(values={"database": {"url": url}})
    secret = find(documents, "Secret", f"{FULLNAME}-migrations")
    job = find(documents, "Job", f"{FULLNAME}-migrations")
    reference = env_of(job["spec"]["template"]["spec"]["containers"][0])["DATABASE_URL"]
    assert base64.b64decode(secret["data"]["DATABASE_URL"]).decode() == url
    assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    assert secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert reference["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULLNAME}-migrations",
        "key": "DATABASE_URL",
    }


def test_crd_is_the_repository_copy_kept_on_uninstall(helm: Helm) -> None:
    documents = helm.template(DEFAULT_VALUES)
    rendered = {
        crd["metadata"]["name"]: crd for crd in of_kind(documents, "CustomResourceDefinition")
    }
    sources = [
        yaml.safe_load(path.read_text()) for path in sorted((REPO_ROOT / "crds").glob("*.yaml"))
    ]
    assert sources, "crds/ holds no CRD"
    assert sorted(rendered) == sorted(source["metadata"]["name"] for source in sources)
    for source in sources:
        crd = rendered[source["metadata"]["name"]]
        assert crd["spec"] == source["spec"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        for key, value in (source["metadata"].get("labels") or {}).items():
            assert crd["metadata"]["labels"][key] == value


def test_crd_can_be_left_to_others(helm: Helm) -> None:
    documents = helm.template(DEFAULT_VALUES, values={"crd": {"install": False}})
    assert of_kind(documents, "CustomResourceDefinition") == []
    unkept = helm.template(DEFAULT_VALUES, values={"crd": {"keep": False}})
    for crd in of_kind(unkept, "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


def test_chart_reads_crds_through_a_symlink() -> None:
    link = CHART / "files" / "crds"
    assert link.is_symlink()
    assert link.resolve() == (REPO_ROOT / "crds").resolve()


def test_production_config_reaches_settings(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    documents = helm.template(PRODUCTION_VALUES)
    env = config_environment(documents, FULLNAME)
    settings = settings_from(
        {**env, "DATABASE_URL": "postgresql://db/secapi", "SECRET_KEY": "k" * 40}, monkeypatch
    )

    assert settings.environment == "production"
    assert settings.executor == "kubernetes"
    assert settings.namespace == "secapi-chart"
    assert settings.registration_open is False
    assert settings.trusted_proxies == ["10.0.0.0/8"]
    assert settings.scanner.max_concurrent_scans == 20
    assert settings.scanner.timeout_seconds == 900
    assert settings.scanner.queue_timeout_seconds == 7200
    assert settings.scanner.server_url == "http://secapi-trivy-server.secapi-chart.svc:4954"
    assert settings.scanner.max_report_bytes == 268435456
    assert settings.scanner.go_gc_percent == 400
    assert settings.scanner.go_memory_limit_bytes is None
    kubernetes = settings.kubernetes
    assert kubernetes.scanner_image == "mirror.example.internal:5000/mirror/trivy:0.74.0"
    assert kubernetes.service_account_name == "secapi-scanner"
    assert (kubernetes.cpu_request, kubernetes.cpu_limit) == ("250m", "2")
    assert (kubernetes.memory_request, kubernetes.memory_limit) == ("512Mi", "4Gi")
    assert kubernetes.cache_size_limit == "8Gi"
    assert kubernetes.node_selector == {"workload": "scans"}
    assert kubernetes.tolerations == [
        {"key": "workload", "operator": "Equal", "value": "scans", "effect": "NoSchedule"}
    ]
    assert kubernetes.max_log_bytes == 67108864
    assert kubernetes.image_pull_grace_seconds == 300


def test_every_config_key_is_a_setting(helm: Helm) -> None:
    # Settings ignores unknown variables, so a misspelt name would silently do nothing.
    documents = helm.template(
        PRODUCTION_VALUES,
        values={
            "scanner": {
                "priorityClassName": "scans",
                "dbRepository": "mirror.example.internal:5000/trivy-db",
                "javaDbRepository": "mirror.example.internal:5000/trivy-java-db",
                "goMemoryLimitBytes": 1073741824,
            }
        },
    )
    env = config_environment(documents, FULLNAME)
    assert env["SECAPI_SCANNER__GO_MEMORY_LIMIT_BYTES"] == "1073741824"
    groups = {
        "SCANNER": Settings.model_fields["scanner"].annotation,
        "KUBERNETES": Settings.model_fields["kubernetes"].annotation,
    }
    for name in env:
        if not name.startswith("SECAPI_"):
            assert name in ("ENVIRONMENT", "RATE_LIMIT_ENABLED"), name
            continue
        field = name.removeprefix("SECAPI_").lower()
        if "__" in field:
            group, _, member = field.partition("__")
            model = groups[group.upper()]
            assert member in model.model_fields, f"{name}: {model.__name__} has no {member}"
        else:
            assert field in Settings.model_fields, f"{name}: Settings has no {field}"


def test_secrets_come_from_existing_secrets(helm: Helm) -> None:
    documents = helm.template(PRODUCTION_VALUES)
    for deployment in ("api", "operator"):
        container = find(documents, "Deployment", f"{FULLNAME}-{deployment}")["spec"]["template"][
            "spec"
        ]["containers"][0]
        env = env_of(container)
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "secapi-credentials",
            "key": "database-url",
        }
        assert env["SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "secapi-credentials",
            "key": "secret-key",
        }
    api_env = env_of(
        find(documents, "Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]["containers"][
            0
        ]
    )
    assert api_env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    # Every credential is someone else's Secret, so the chart creates none.
    assert of_kind(documents, "Secret") == []


def test_generated_secret_key_is_long_and_kept(helm: Helm) -> None:
    documents = helm.template(DEFAULT_VALUES)
    secret = find(documents, "Secret", f"{FULLNAME}-secret-key")
    key = base64.b64decode(secret["data"]["SECRET_KEY"]).decode()
    assert len(key) >= 32
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    configmap = find(documents, "ConfigMap", FULLNAME)
    assert key not in json.dumps(configmap)


def test_inline_credentials_stay_out_of_the_configmap(helm: Helm) -> None:
    database_url = "postgresql://secapi:db-password-1@db.example.internal/secapi"
    redis_url = "redis://:redis-password-1@redis.example.internal:6379/0"
    secret_key = "x" * 48
    documents = helm.template(
        values={
            "database": {"url": database_url},
            "redis": {"url": redis_url},
            "secretKey": {"value": secret_key},
        }
    )
    secret = find(documents, "Secret", f"{FULLNAME}-config")
    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert decoded == {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    key_secret = find(documents, "Secret", f"{FULLNAME}-secret-key")
    assert base64.b64decode(key_secret["data"]["SECRET_KEY"]).decode() == secret_key
    # A key the user chose is theirs to keep; only a generated one outlives the release.
    assert "annotations" not in key_secret["metadata"]
    configmap_text = json.dumps(find(documents, "ConfigMap", FULLNAME))
    for value in ("db-password-1", "redis-password-1", secret_key):
        assert value not in configmap_text


def test_network_policy_confines_scan_pods(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    documents = helm.template(DEFAULT_VALUES)
    policy = find(documents, "NetworkPolicy", f"{FULLNAME}-scan-pods")
    settings = settings_from(
        {**config_environment(documents, FULLNAME), "SECRET_KEY": "k" * 40}, monkeypatch
    )
    pod_labels = scan_pod(settings)["metadata"]["labels"]

    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == []

    egress = policy["spec"]["egress"]
    dns_ports = {(port["port"], port["protocol"]) for port in egress[0]["ports"]}
    assert dns_ports == {(53, "UDP"), (53, "TCP")}
    trivy = egress[1]
    assert trivy["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "trivy-server"
    )
    assert trivy["ports"] == [{"port": 4954, "protocol": "TCP"}]
    registries = egress[2]
    blocks = {peer["ipBlock"]["cidr"]: peer["ipBlock"].get("except") for peer in registries["to"]}
    assert blocks == {"0.0.0.0/0": ["169.254.169.254/32"], "::/0": None}
    assert registries["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert len(egress) == 3


def test_trivy_server_accepts_only_scan_pods(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    documents = helm.template(DEFAULT_VALUES)
    policy = find(documents, "NetworkPolicy", f"{FULLNAME}-trivy-server")
    settings = settings_from(
        {**config_environment(documents, FULLNAME), "SECRET_KEY": "k" * 40}, monkeypatch
    )
    pod_labels = scan_pod(settings)["metadata"]["labels"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert rule["ports"] == [{"port": 4954, "protocol": "TCP"}]


def test_standalone_mode_drops_the_trivy_server(helm: Helm) -> None:
    documents = helm.template(DEFAULT_VALUES, values={"trivyServer": {"enabled": False}})
    names = {f"{document['kind']}/{document['metadata']['name']}" for document in documents}
    assert not any("trivy-server" in name for name in names)
    env = config_environment(documents, FULLNAME)
    assert "SECAPI_SCANNER__SERVER_URL" not in env
    egress = find(documents, "NetworkPolicy", f"{FULLNAME}-scan-pods")["spec"]["egress"]
    assert len(egress) == 2


def test_evaluation_runs_its_own_database(helm: Helm) -> None:
    documents = helm.template(EVALUATION_VALUES)
    find(documents, "Deployment", f"{FULLNAME}-postgresql")
    find(documents, "Deployment", f"{FULLNAME}-redis")
    secret = find(documents, "Secret", f"{FULLNAME}-evaluation")
    assert len(base64.b64decode(secret["data"]["postgres-password"])) == 32

    container = find(documents, "Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"][
        "containers"
    ][0]
    names = [item["name"] for item in container["env"]]
    # $(VAR) expands only variables defined earlier in the list.
    assert names.index("SECAPI_EVALUATION_POSTGRES_PASSWORD") < names.index("DATABASE_URL")
    assert names.index("SECAPI_EVALUATION_REDIS_PASSWORD") < names.index("REDIS_URL")
    assert env_of(container)["DATABASE_URL"]["value"] == (
        "postgresql://secapi:$(SECAPI_EVALUATION_POSTGRES_PASSWORD)@secapi-postgresql:5432/secapi"
    )
    find(documents, "NetworkPolicy", f"{FULLNAME}-evaluation")


def test_production_values_render_what_they_ask_for(helm: Helm) -> None:
    documents = helm.template(PRODUCTION_VALUES)
    api = find(documents, "Deployment", f"{FULLNAME}-api")
    spec = api["spec"]["template"]["spec"]
    assert api["spec"]["replicas"] == 3
    assert spec["containers"][0]["image"] == (
        "mirror.example.internal:5000/security/secapi-api@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert spec["imagePullSecrets"] == [{"name": "mirror-pull"}]
    assert api["metadata"]["labels"]["team"] == "platform-security"

    ingress = find(documents, "Ingress", f"{FULLNAME}-api")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["secapi.example.com"], "secretName": "secapi-tls"}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend == {"service": {"name": f"{FULLNAME}-api", "port": {"name": "http"}}}

    assert find(documents, "PodDisruptionBudget", f"{FULLNAME}-api")["spec"]["maxUnavailable"] == (
        "34%"
    )
    server = find(documents, "StatefulSet", f"{FULLNAME}-trivy-server")
    assert server["spec"]["replicas"] == 2
    claim = server["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "--db-repository" in server["spec"]["template"]["spec"]["containers"][0]["args"]
    scanner_account = find(documents, "ServiceAccount", f"{FULLNAME}-scanner")
    assert scanner_account["imagePullSecrets"] == [{"name": "mirror-pull"}]

    policy = find(documents, "NetworkPolicy", f"{FULLNAME}-scan-pods")
    registries = policy["spec"]["egress"][2]
    assert registries["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert [port["port"] for port in registries["ports"]] == [443, 5000]


def test_helm_test_pod_checks_health(helm: Helm) -> None:
    documents = helm.template(DEFAULT_VALUES)
    pod = find(documents, "Pod", f"{FULLNAME}-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[-1] == "http://secapi-api.secapi-chart.svc:80/health"


def test_names_fit_in_63_characters(helm: Helm) -> None:
    # Helm accepts release names of at most 53 characters.
    release = "a-release-name-much-longer-than-anyone-would-choose-x"
    assert len(release) == 53
    documents = helm.template(DEFAULT_VALUES, release=release)
    too_long = [
        document["metadata"]["name"]
        for document in documents
        if len(document["metadata"]["name"]) > 63
    ]
    assert too_long == []
    assert len(documents) > 20
    # A StatefulSet's pods carry a label of its name plus 11 characters; labels stop at 63.
    for statefulset in of_kind(documents, "StatefulSet"):
        assert len(statefulset["metadata"]["name"]) <= 52


def test_config_change_rolls_the_pods(helm: Helm) -> None:
    def checksums(documents: list[dict[str, Any]]) -> dict[str, str]:
        annotations = find(documents, "Deployment", f"{FULLNAME}-api")["spec"]["template"][
            "metadata"
        ]["annotations"]
        return {key: value for key, value in annotations.items() if key.startswith("checksum/")}

    before = checksums(helm.template(DEFAULT_VALUES))
    after = checksums(helm.template(DEFAULT_VALUES, values={"scanner": {"timeoutSeconds": 1200}}))
    assert before["checksum/config"] != after["checksum/config"]


def test_release_name_reaches_object_names(helm: Helm) -> None:
    documents = helm.template(DEFAULT_VALUES, release="scanning")
    deployment = find(documents, "Deployment", "scanning-secapi-api")
    assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "scanning"


def notes(helm: Helm, *value_files: Path, values: dict[str, Any] | None = None) -> str:
    """Return the NOTES.txt that `helm install` prints, rendered without a cluster."""
    args = ["install", RELEASE, str(CHART), "--namespace", "secapi-chart", "--dry-run=client"]
    for path in value_files:
        args += ["--values", str(path)]
    if values:
        args += ["--values", str(helm.write_values(values))]
    output = helm.run(*args).stdout
    assert "NOTES:" in output
    return output.split("NOTES:", 1)[1]


def test_notes_explain_register_and_scan(helm: Helm) -> None:
    text = notes(helm, DEFAULT_VALUES)
    assert "port-forward service/secapi-api 8000:80" in text
    assert "/api/v1/auth/register" in text
    assert '-H "X-API-Key: $SECAPI_KEY"' in text
    assert "/api/v1/scan/docker" in text
    assert "helm test secapi --namespace secapi-chart" in text
    assert "EVALUATION MODE" not in text
    # Two replicas without Redis share no rate limit counters.
    assert "WARNING: no Redis is configured" in text


def test_notes_warn_loudly_in_evaluation_mode(helm: Helm) -> None:
    text = notes(helm, EVALUATION_VALUES)
    assert "EVALUATION MODE - NOT FOR PRODUCTION" in text
    assert "WARNING: no Redis" not in text


def test_notes_follow_ingress_and_closed_registration(helm: Helm) -> None:
    text = notes(helm, PRODUCTION_VALUES)
    assert "export SECAPI_URL=https://secapi.example.com" in text
    assert "Registration is closed" in text
    assert "secapi admin create-user" in text
    assert "port-forward" not in text


def test_kind_values_use_the_loaded_images(helm: Helm) -> None:
    documents = helm.template(REPO_ROOT / "tests" / "kind" / "values.yaml")
    for component in ("api", "operator"):
        container = find(documents, "Deployment", f"{FULLNAME}-{component}")["spec"]["template"][
            "spec"
        ]["containers"][0]
        assert container["image"] == f"secapi/{component}:e2e"
        assert container["imagePullPolicy"] == "Never"
    find(documents, "Deployment", f"{FULLNAME}-postgresql")
