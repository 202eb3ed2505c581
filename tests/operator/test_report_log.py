"""The scan script and the log decoder, run with real shells and a stand-in Trivy.

The stand-in `trivy` on PATH records its arguments and writes a report to the
file named by `--output`. These tests check the script itself: the image must
reach Trivy as one argument after `--`, and the printed block must decode back
to the exact bytes.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from secapi.operator.jobs import SCRIPT_NAME
from secapi.operator.report_log import (
    BEGIN_MARKER,
    END_MARKER,
    SCAN_SCRIPT,
    WORK_DIR_VARIABLE,
    ReportLogError,
    decode_report_log,
)

FAKE_TRIVY = r"""#!/bin/sh
# Record every argument on its own line, then write the report file.
for argument in "$@"; do printf '%s\n' "$argument"; done > "$FAKE_TRIVY_ARGS"
output=""
previous=""
for argument in "$@"; do
  if [ "$previous" = "--output" ]; then output="$argument"; fi
  previous="$argument"
done
if [ -n "${FAKE_TRIVY_EXIT:-}" ]; then
  echo "FATAL image scan error: $FAKE_TRIVY_EXIT_MESSAGE" >&2
  exit "$FAKE_TRIVY_EXIT"
fi
cat "$FAKE_TRIVY_REPORT" > "$output"
"""

SHELLS = [
    pytest.param(["/bin/sh"], id="sh"),
    pytest.param(
        ["busybox", "sh"],
        id="busybox",
        marks=pytest.mark.skipif(
            shutil.which("busybox") is None, reason="busybox is not installed"
        ),
    ),
]


def run_script(
    shell: list[str],
    tmp_path: Path,
    *,
    image: str,
    report: bytes,
    flags: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    trivy = bin_dir / "trivy"
    trivy.write_text(FAKE_TRIVY)
    trivy.chmod(0o755)
    report_file = tmp_path / "input.json"
    report_file.write_bytes(report)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)

    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        WORK_DIR_VARIABLE: str(work),
        "FAKE_TRIVY_ARGS": str(tmp_path / "args.txt"),
        "FAKE_TRIVY_REPORT": str(report_file),
        **(extra_env or {}),
    }
    return subprocess.run(
        [*shell, "-c", SCAN_SCRIPT, SCRIPT_NAME, image, *(flags or [])],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )


def sample_report(findings: int = 3) -> bytes:
    vulnerabilities = [
        {"VulnerabilityID": f"CVE-2024-{index:05d}", "PkgName": "openssl", "Severity": "HIGH"}
        for index in range(findings)
    ]
    return json.dumps(
        {"SchemaVersion": 2, "Results": [{"Vulnerabilities": vulnerabilities}]}
    ).encode()


@pytest.mark.parametrize("shell", SHELLS)
def test_script_round_trips_report(shell: list[str], tmp_path: Path) -> None:
    report = sample_report(500)
    result = run_script(shell, tmp_path, image="127.0.0.1:5000/app:1.0", report=report)

    assert result.returncode == 0, result.stderr.decode()
    decoded = decode_report_log(result.stdout, max_report_bytes=len(report))
    assert decoded.data == report
    assert decoded.sha256 == hashlib.sha256(report).hexdigest()


@pytest.mark.parametrize("shell", SHELLS)
def test_script_passes_image_as_one_argument(shell: list[str], tmp_path: Path) -> None:
    # Nothing in a hostile reference may be evaluated, split or read as a flag.
    image = "-x; touch pwned $(id) `id` 'q' \"d\" *"
    result = run_script(
        shell, tmp_path, image=image, report=b"{}", flags=["--scanners", "vuln,secret"]
    )

    assert result.returncode == 0, result.stderr.decode()
    arguments = (tmp_path / "args.txt").read_text().splitlines()
    assert arguments[0] == "image"
    assert arguments[-2:] == ["--", image]
    assert arguments[1:3] == ["--scanners", "vuln,secret"]
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "work" / "pwned").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_script_reports_trivy_failure(shell: list[str], tmp_path: Path) -> None:
    result = run_script(
        shell,
        tmp_path,
        image="app:1",
        report=b"{}",
        extra_env={"FAKE_TRIVY_EXIT": "1", "FAKE_TRIVY_EXIT_MESSAGE": "MANIFEST_UNKNOWN"},
    )

    assert result.returncode == 1
    assert BEGIN_MARKER.encode() not in result.stdout
    assert b"MANIFEST_UNKNOWN" in result.stderr
    assert b"trivy exited with status 1" in result.stderr


def test_script_has_no_kubernetes_variable_references() -> None:
    # Kubernetes rewrites $(NAME) and $$ in command and args before the shell sees them.
    import re

    assert re.search(r"\$\([A-Za-z_][A-Za-z0-9_.-]*\)", SCAN_SCRIPT) is None
    assert "$$" not in SCAN_SCRIPT


def encode_block(report: bytes, *, declared: int | None = None, digest: str | None = None) -> bytes:
    size = len(report) if declared is None else declared
    sha = hashlib.sha256(report).hexdigest() if digest is None else digest
    encoded = base64.encodebytes(gzip.compress(report)).decode()
    return (
        '2024-01-01T00:00:00Z INFO Detected OS family="alpine"\n'
        f"{BEGIN_MARKER} v1 bytes={size} sha256={sha} encoding=gzip+base64\n"
        f"{encoded}"
        f"{END_MARKER} v1 bytes={size} sha256={sha}\n"
    ).encode()


def test_decode_accepts_intact_block() -> None:
    report = sample_report()
    assert decode_report_log(encode_block(report), max_report_bytes=10**6).data == report


def test_decode_uses_last_block() -> None:
    # Trivy's own output comes first; only the block the script printed last counts.
    first = encode_block(b'{"fake": true}')
    report = sample_report()
    assert decode_report_log(first + encode_block(report), max_report_bytes=10**6).data == report


def test_decode_rejects_missing_begin_marker() -> None:
    log = encode_block(sample_report())
    cut = log[log.index(b"\n", log.index(BEGIN_MARKER.encode())) + 1 :]
    with pytest.raises(ReportLogError, match="beginning marker is missing"):
        decode_report_log(cut, max_report_bytes=10**6)


def test_decode_rejects_missing_end_marker() -> None:
    log = encode_block(sample_report(200))
    with pytest.raises(ReportLogError, match="end marker is missing"):
        decode_report_log(log[: len(log) // 2], max_report_bytes=10**6)


def test_decode_rejects_lost_middle_lines() -> None:
    lines = encode_block(sample_report(400)).split(b"\n")
    del lines[4]
    with pytest.raises(ReportLogError):
        decode_report_log(b"\n".join(lines), max_report_bytes=10**6)


def test_decode_rejects_wrong_digest() -> None:
    with pytest.raises(ReportLogError, match="SHA-256"):
        decode_report_log(encode_block(sample_report(), digest="0" * 64), max_report_bytes=10**6)


def test_decode_rejects_wrong_size() -> None:
    report = sample_report()
    with pytest.raises(ReportLogError, match="bytes but the scan declared"):
        decode_report_log(encode_block(report, declared=len(report) + 1), max_report_bytes=10**6)


def test_decode_rejects_damaged_base64() -> None:
    log = encode_block(sample_report()).replace(b"\n", b"\n!!", 3)
    with pytest.raises(ReportLogError):
        decode_report_log(log, max_report_bytes=10**6)


def test_decode_rejects_mismatched_markers() -> None:
    report = sample_report()
    sha = hashlib.sha256(report).hexdigest()
    log = encode_block(report).replace(
        f"{END_MARKER} v1 bytes={len(report)}".encode(), f"{END_MARKER} v1 bytes=1".encode()
    )
    assert sha.encode() in log
    with pytest.raises(ReportLogError, match="does not match"):
        decode_report_log(log, max_report_bytes=10**6)


def test_decode_refuses_report_over_maximum() -> None:
    report = sample_report(100)
    with pytest.raises(ReportLogError) as caught:
        decode_report_log(encode_block(report), max_report_bytes=len(report) - 1)
    assert caught.value.too_large


def test_decode_stops_gzip_bomb_at_declared_size() -> None:
    # A block that declares 10 bytes but inflates to 50 MB must not be inflated whole.
    bomb = b"\0" * 50_000_000
    encoded = base64.encodebytes(gzip.compress(bomb)).decode()
    sha = hashlib.sha256(bomb[:10]).hexdigest()
    log = (
        f"{BEGIN_MARKER} v1 bytes=10 sha256={sha} encoding=gzip+base64\n"
        f"{encoded}{END_MARKER} v1 bytes=10 sha256={sha}\n"
    ).encode()
    with pytest.raises(ReportLogError, match="11 bytes but the scan declared 10"):
        decode_report_log(log, max_report_bytes=10**9)


def test_decode_rejects_unknown_format_version() -> None:
    log = encode_block(sample_report()).replace(b" v1 ", b" v9 ")
    with pytest.raises(ReportLogError, match="format v9"):
        decode_report_log(log, max_report_bytes=10**6)
