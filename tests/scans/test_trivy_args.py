"""Trivy's argument lists: built from options and settings, never a shell string."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from secapi.core.scans.go_runtime import available_memory_bytes, local_memory_limit
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.trivy import (
    build_db_download_command,
    build_scan_command,
    build_version_command,
    effective_timeout,
    job_trivy_flags,
    parse_version_output,
    probe_version,
    resolve_cache_dir,
)
from secapi.core.settings import ScannerSettings, Settings

OUTPUT = Path("/work/report.json")
CACHE = Path("/var/cache/trivy")


def scan_command(
    options: ScanOptions | None = None, scanner: ScannerSettings | None = None, **kwargs: object
) -> list[str]:
    values: dict[str, object] = {
        "trivy_bin": "/opt/trivy",
        "image": "nginx:1.27",
        "output": OUTPUT,
        "options": options or ScanOptions(),
        "scanner": scanner or ScannerSettings(),
        "cache_dir": CACHE,
        "timeout_seconds": 300,
    }
    values.update(kwargs)
    return build_scan_command(**values)  # type: ignore[arg-type]


def value_after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_default_command_shape() -> None:
    command = scan_command()

    assert command[:2] == ["/opt/trivy", "image"]
    assert command[-2:] == ["--", "nginx:1.27"]
    assert value_after(command, "--format") == "json"
    assert value_after(command, "--output") == str(OUTPUT)
    assert "--quiet" in command
    assert value_after(command, "--scanners") == "vuln,secret"
    assert value_after(command, "--severity") == "UNKNOWN,LOW,MEDIUM,HIGH,CRITICAL"
    assert value_after(command, "--timeout") == "300s"
    assert value_after(command, "--cache-backend") == "memory"
    assert value_after(command, "--cache-dir") == str(CACHE)
    assert value_after(command, "--image-src") == "remote"
    assert "--skip-version-check" in command
    assert "--disable-telemetry" in command
    for absent in ("--ignore-unfixed", "--platform", "--insecure", "--server", "--skip-db-update"):
        assert absent not in command


def test_every_argument_is_one_list_item() -> None:
    options = ScanOptions(
        scanners=["vuln", "misconfig"],
        severities=["HIGH", "CRITICAL"],
        ignore_unfixed=True,
        platform="linux/arm64/v8",
    )
    command = scan_command(options, image="127.0.0.1:5000/a/b:1@sha256:" + "0" * 64)

    assert all(isinstance(part, str) and part for part in command)
    assert value_after(command, "--scanners") == "vuln,misconfig"
    assert value_after(command, "--severity") == "HIGH,CRITICAL"
    assert "--ignore-unfixed" in command
    assert value_after(command, "--platform") == "linux/arm64/v8"
    assert command[-1] == "127.0.0.1:5000/a/b:1@sha256:" + "0" * 64


def test_image_comes_after_double_dash() -> None:
    command = scan_command(image="-looks-like-a-flag")

    assert command.index("--") == len(command) - 2
    assert command.count("-looks-like-a-flag") == 1


def test_offline_skips_every_download() -> None:
    command = scan_command(scanner=ScannerSettings(offline=True))

    for flag in (
        "--skip-db-update",
        "--skip-java-db-update",
        "--skip-check-update",
        "--offline-scan",
    ):
        assert flag in command


def test_managed_db_skips_db_update_only() -> None:
    command = scan_command(skip_db_update=True)

    assert "--skip-db-update" in command
    assert "--skip-java-db-update" not in command


def test_repositories_insecure_and_server() -> None:
    scanner = ScannerSettings(
        db_repository="127.0.0.1:5000/mirror/trivy-db:2",
        java_db_repository="127.0.0.1:5000/mirror/trivy-java-db:1",
        insecure_registries=True,
    )
    command = scan_command(scanner=scanner)

    assert value_after(command, "--db-repository") == "127.0.0.1:5000/mirror/trivy-db:2"
    assert value_after(command, "--java-db-repository") == "127.0.0.1:5000/mirror/trivy-java-db:1"
    assert "--insecure" in command

    client = scan_command(scanner=ScannerSettings(server_url="http://127.0.0.1:4954", offline=True))
    assert value_after(client, "--server") == "http://127.0.0.1:4954"
    # A client never downloads a DB, so DB flags are left out.
    assert "--skip-db-update" not in client
    assert "--db-repository" not in client


def test_timeout_is_bounded_by_maximum() -> None:
    scanner = ScannerSettings(timeout_seconds=600, max_timeout_seconds=900)

    assert effective_timeout(ScanOptions(), scanner) == 600
    assert effective_timeout(ScanOptions(timeout_seconds=60), scanner) == 60
    assert effective_timeout(ScanOptions(timeout_seconds=5000), scanner) == 900


def test_job_flags_leave_out_output_and_cache() -> None:
    settings = Settings(scanner={"timeout_seconds": 120, "offline": True})
    flags = job_trivy_flags(ScanOptions(scanners=["vuln"]), settings)

    for absent in ("--output", "--format", "--cache-dir", "--"):
        assert absent not in flags
    assert value_after(flags, "--timeout") == "120s"
    assert value_after(flags, "--scanners") == "vuln"
    assert "--skip-db-update" in flags


def test_cache_dir_resolution() -> None:
    configured = ScannerSettings(cache_dir=Path("/data/trivy"))
    unset = ScannerSettings()

    assert resolve_cache_dir(configured, {"TRIVY_CACHE_DIR": "/elsewhere"}) == Path("/data/trivy")
    assert resolve_cache_dir(unset, {"TRIVY_CACHE_DIR": "/elsewhere"}) == Path("/elsewhere")
    assert resolve_cache_dir(unset, {"XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/trivy")


def test_relative_cache_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = ScannerSettings(cache_dir=Path("cache/trivy"))
    unset = ScannerSettings()

    assert resolve_cache_dir(relative, {}) == tmp_path / "cache/trivy"
    assert resolve_cache_dir(unset, {"TRIVY_CACHE_DIR": "other"}) == tmp_path / "other"


def _help_flags(trivy_bin: str, *args: str) -> set[str]:
    text = subprocess.run(
        [trivy_bin, *args, "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


def test_every_flag_exists_in_trivy(trivy_bin: str) -> None:
    known = _help_flags(trivy_bin, "image")
    scanner = ScannerSettings(
        offline=True,
        insecure_registries=True,
        db_repository="127.0.0.1:1/db:2",
        java_db_repository="127.0.0.1:1/java:1",
        server_url=None,
    )
    options = ScanOptions(ignore_unfixed=True, platform="linux/amd64")
    commands = [
        scan_command(options, scanner),
        scan_command(options, ScannerSettings(server_url="http://127.0.0.1:1")),
        build_db_download_command(
            trivy_bin=trivy_bin, scanner=scanner, cache_dir=CACHE, timeout_seconds=60
        ),
    ]
    for command in commands:
        for part in command:
            if part.startswith("--") and part != "--":
                assert part.split("=")[0] in known, part


def test_version_command_shape() -> None:
    assert build_version_command(trivy_bin="/opt/trivy", cache_dir=CACHE) == [
        "/opt/trivy",
        "version",
        "--format",
        "json",
        "--cache-dir",
        str(CACHE),
    ]


def test_version_output_parsing() -> None:
    parsed = parse_version_output(
        b'{"Version":"0.74.0","VulnerabilityDB":{"Version":2,'
        b'"NextUpdate":"2026-12-05T02:00:00Z","UpdatedAt":"2026-12-04T20:00:00.5Z"}}'
    )

    assert parsed.version == "0.74.0"
    assert parsed.db_updated_at == datetime(2026, 12, 4, 20, 0, 0, 500000, tzinfo=UTC)
    assert parsed.db_next_update == datetime(2026, 12, 5, 2, tzinfo=UTC)
    assert parse_version_output(b'{"Version":"0.74.0"}').db_updated_at is None
    for bad in (b"", b"[]", b'{"version": 1}', b"Version: 0.74.0"):
        with pytest.raises(ValueError):
            parse_version_output(bad)


async def test_version_probe(trivy_bin: str, trivy_cache: Path, tmp_path: Path) -> None:
    with_db = await probe_version(trivy_bin=trivy_bin, cache_dir=trivy_cache)
    without_db = await probe_version(trivy_bin=trivy_bin, cache_dir=tmp_path)

    assert with_db.version == "0.74.0"
    assert with_db.db_updated_at is not None
    assert without_db.version == "0.74.0"
    assert without_db.db_updated_at is None


def test_severities_take_any_case() -> None:
    options = ScanOptions(severities=["high", "Critical", "HIGH"])

    assert options.severities == ["HIGH", "CRITICAL"]
    with pytest.raises(ValidationError):
        ScanOptions(severities=["severe"])


def test_local_memory_limit_shares_the_memory() -> None:
    total = available_memory_bytes()
    assert total is not None
    assert total <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # Each of four processes may use its share twice over before the sum reaches the total.
    assert local_memory_limit(4) == total // 8


def test_go_memory_limit_setting_rejects_tiny_values() -> None:
    with pytest.raises(ValidationError, match="go_memory_limit_bytes"):
        ScannerSettings(go_memory_limit_bytes=1024)
