"""Failure reasons from what Trivy prints, checked against real Trivy runs on loopback."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from secapi.core.scans.failures import (
    MAX_MESSAGE_LENGTH,
    classify_trivy_failure,
    scrub_credentials,
    secret_values,
)
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.process import trivy_environment
from secapi.core.scans.reasons import FailureReason
from secapi.core.scans.trivy import build_scan_command
from secapi.core.settings import ScannerSettings
from tests.scans.servers import AuthRegistry, auth_registry, copy_image, unused_port

ALPINE = "fixtures/alpine:3.17"
PRIVATE = "private/alpine:3.17"


@pytest.fixture(scope="module")
def private_registry(
    registry: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthRegistry]:
    """An htpasswd registry holding one copy of the alpine fixture."""
    with auth_registry(tmp_path_factory.mktemp("auth-registry")) as server:
        copy_image(
            f"{registry}/{ALPINE}",
            f"{server.address}/{PRIVATE}",
            dest_creds=f"{server.username}:{server.password}",
        )
        yield server


def run_trivy(
    trivy_bin: str,
    image: str,
    *,
    cache_dir: Path,
    work: Path,
    environment: dict[str, str] | None = None,
    scanner: ScannerSettings | None = None,
) -> subprocess.CompletedProcess[str]:
    command = build_scan_command(
        trivy_bin=trivy_bin,
        image=image,
        output=work / "report.json",
        options=ScanOptions(),
        scanner=scanner or ScannerSettings(offline=True, insecure_registries=True),
        cache_dir=cache_dir,
        timeout_seconds=60,
    )
    env = trivy_environment({**os.environ, **(environment or {})})
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def classify(result: subprocess.CompletedProcess[str], **kwargs: object) -> tuple[str, str]:
    assert result.returncode != 0, result.stderr
    reason, message = classify_trivy_failure(result.stderr, result.returncode, **kwargs)  # type: ignore[arg-type]
    return reason, message


def test_missing_tag_is_image_not_found(
    trivy_bin: str, trivy_cache: Path, registry: str, tmp_path: Path
) -> None:
    result = run_trivy(
        trivy_bin, f"{registry}/fixtures/alpine:no-such-tag", cache_dir=trivy_cache, work=tmp_path
    )
    reason, message = classify(result)

    assert reason == FailureReason.IMAGE_NOT_FOUND
    assert "MANIFEST_UNKNOWN" in message
    assert f"{registry}/fixtures/alpine:no-such-tag" in message
    # The wrapper chain of Trivy's call stack is cut.
    assert "run error" not in message
    assert "FATAL" not in message


def test_missing_repository_is_image_not_found(
    trivy_bin: str, trivy_cache: Path, registry: str, tmp_path: Path
) -> None:
    result = run_trivy(
        trivy_bin, f"{registry}/no/such-repo:1", cache_dir=trivy_cache, work=tmp_path
    )

    assert classify(result)[0] == FailureReason.IMAGE_NOT_FOUND


def test_closed_port_is_registry_unreachable(
    trivy_bin: str, trivy_cache: Path, tmp_path: Path
) -> None:
    image = f"127.0.0.1:{unused_port()}/app:1"
    result = run_trivy(trivy_bin, image, cache_dir=trivy_cache, work=tmp_path)
    reason, message = classify(result)

    assert reason == FailureReason.REGISTRY_UNREACHABLE
    assert "connection refused" in message


def test_missing_credentials_is_auth_failed(
    trivy_bin: str, trivy_cache: Path, private_registry: AuthRegistry, tmp_path: Path
) -> None:
    result = run_trivy(
        trivy_bin, f"{private_registry.address}/{PRIVATE}", cache_dir=trivy_cache, work=tmp_path
    )
    reason, message = classify(result)

    assert reason == FailureReason.REGISTRY_AUTH_FAILED
    assert "UNAUTHORIZED" in message


def test_wrong_password_is_auth_failed_and_hidden(
    trivy_bin: str, trivy_cache: Path, private_registry: AuthRegistry, tmp_path: Path
) -> None:
    environment = {
        "TRIVY_USERNAME": private_registry.username,
        "TRIVY_PASSWORD": "Wr0ng-Passw0rd-99",
    }
    result = run_trivy(
        trivy_bin,
        f"{private_registry.address}/{PRIVATE}",
        cache_dir=trivy_cache,
        work=tmp_path,
        environment=environment,
    )
    reason, message = classify(result, secrets=secret_values(environment))

    assert reason == FailureReason.REGISTRY_AUTH_FAILED
    assert "Wr0ng-Passw0rd-99" not in message


def test_credentials_reach_trivy_through_environment(
    trivy_bin: str, trivy_cache: Path, private_registry: AuthRegistry, tmp_path: Path
) -> None:
    environment = {
        "TRIVY_USERNAME": private_registry.username,
        "TRIVY_PASSWORD": private_registry.password,
    }
    result = run_trivy(
        trivy_bin,
        f"{private_registry.address}/{PRIVATE}",
        cache_dir=trivy_cache,
        work=tmp_path,
        environment=environment,
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.json").stat().st_size > 0


def test_missing_image_with_credentials_is_not_found(
    trivy_bin: str, trivy_cache: Path, private_registry: AuthRegistry, tmp_path: Path
) -> None:
    # Trivy tries the credentials and then anonymously, so it prints both errors.
    environment = {
        "TRIVY_USERNAME": private_registry.username,
        "TRIVY_PASSWORD": private_registry.password,
    }
    result = run_trivy(
        trivy_bin,
        f"{private_registry.address}/private/nothing:1",
        cache_dir=trivy_cache,
        work=tmp_path,
        environment=environment,
    )
    reason, message = classify(result, secrets=secret_values(environment))

    assert "UNAUTHORIZED" in result.stderr
    assert reason == FailureReason.IMAGE_NOT_FOUND
    assert private_registry.password not in message


def test_offline_without_db_is_database_unavailable(
    trivy_bin: str, registry: str, tmp_path: Path
) -> None:
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    result = run_trivy(trivy_bin, f"{registry}/{ALPINE}", cache_dir=empty_cache, work=tmp_path)
    reason, message = classify(result)

    assert reason == FailureReason.DATABASE_UNAVAILABLE
    assert "--skip-db-update cannot be specified on the first run" in message
    assert message.startswith("Trivy found no vulnerability DB in its cache folder")
    assert "SECAPI_SCANNER__CACHE_DIR" in message


def test_failed_db_download_is_database_unavailable(
    trivy_bin: str, registry: str, tmp_path: Path
) -> None:
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    scanner = ScannerSettings(db_repository=f"127.0.0.1:{unused_port()}/mirror/trivy-db:2")
    result = run_trivy(
        trivy_bin, f"{registry}/{ALPINE}", cache_dir=empty_cache, work=tmp_path, scanner=scanner
    )
    reason, message = classify(result)

    assert reason == FailureReason.DATABASE_UNAVAILABLE
    assert "failed to download vulnerability DB" in message
    assert "connection refused" in message


def test_artifact_is_scanner_error(
    trivy_bin: str, trivy_cache: Path, registry: str, tmp_path: Path
) -> None:
    result = run_trivy(
        trivy_bin, f"{registry}/fixtures/artifact:1.0", cache_dir=trivy_cache, work=tmp_path
    )
    reason, message = classify(result)

    assert reason == FailureReason.SCANNER_ERROR
    # What is wrong and what to do come first, then Trivy's own words.
    assert message.startswith(
        "the reference points to an OCI artifact of type application/vnd.secapi.fixture.notes.v1, "
        "not a container image; SecAPI scans container images, so submit the reference of one. "
        "Trivy reported: "
    )
    assert 'unsupported artifact type "application/vnd.secapi.fixture.notes.v1"' in message


def test_artifact_message_is_trimmed() -> None:
    long_type = "application/vnd.example." + "x" * 2000
    output = (
        "2026-01-01T00:00:00Z\tFATAL\tFatal error\trun error: unable to find the specified image "
        f'"r.example/a:1" in ["remote"]: remote error: unsupported artifact type "{long_type}"\n'
    )

    reason, message = classify_trivy_failure(output, 1)

    assert reason == FailureReason.SCANNER_ERROR
    assert message.startswith("the reference points to an OCI artifact of type application/vnd.")
    assert len(message) == MAX_MESSAGE_LENGTH
    assert message.endswith("...")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("GET https://r.example/v2/: TOOMANYREQUESTS: rate exceeded", FailureReason.RATE_LIMITED),
        ('Get "https://r.example/v2/": context deadline exceeded', FailureReason.TIMEOUT),
        ("dial tcp: lookup r.example: no such host", FailureReason.REGISTRY_UNREACHABLE),
        (
            "tls: failed to verify certificate: x509: unknown authority",
            FailureReason.REGISTRY_UNREACHABLE,
        ),
        ("DENIED: requested access to the resource is denied", FailureReason.REGISTRY_AUTH_FAILED),
        ("open /tmp/x: permission denied", FailureReason.SCANNER_ERROR),
        ("something unexpected", FailureReason.SCANNER_ERROR),
    ],
)
def test_reason_of_other_texts(text: str, reason: FailureReason) -> None:
    output = f"2026-01-01T00:00:00Z\tFATAL\tFatal error\trun error: {text}\n"

    assert classify_trivy_failure(output, 1)[0] == reason


def test_credentials_are_scrubbed() -> None:
    text = (
        'Get "https://robot:hunter2secret@r.example/v2/": authorization: Bearer abcdefghijkl; '
        "password=p4ss-w0rd token: tok123456"
    )
    scrubbed = scrub_credentials(text, secrets=["literal-secret-value"])

    for secret in ("hunter2secret", "abcdefghijkl", "p4ss-w0rd", "tok123456", "robot:"):
        assert secret not in scrubbed
    assert "r.example" in scrubbed
    assert scrub_credentials("use literal-secret-value here", secrets=["literal-secret-value"]) == (
        "use [redacted] here"
    )


def test_message_is_trimmed() -> None:
    output = "2026-01-01T00:00:00Z\tFATAL\tFatal error\t" + "x" * 5000

    reason, message = classify_trivy_failure(output, 1)
    assert len(message) == MAX_MESSAGE_LENGTH
    assert message.endswith("...")
    assert reason == FailureReason.SCANNER_ERROR


def test_silent_failure_names_exit_code() -> None:
    reason, message = classify_trivy_failure("", 137)

    assert reason == FailureReason.SCANNER_ERROR
    assert "137" in message
