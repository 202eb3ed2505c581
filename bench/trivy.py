"""The bare Trivy command SecAPI is compared with: the local executor's own command line.

It is built by the same function the local executor uses
(`secapi.core.scans.trivy.build_scan_command`) from the same scanner settings
the benchmark gives `secapi serve`, so both sides read the same DB with the
same flags and write the same JSON report.
"""

from __future__ import annotations

from pathlib import Path

from bench.bed import Bed
from secapi.core.scans.go_runtime import go_runtime_environment, local_memory_limit
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.trivy import build_scan_command, effective_timeout
from secapi.core.settings import ScannerSettings


def scanner_settings(bed: Bed, *, max_concurrent_scans: int = 1) -> ScannerSettings:
    """Return the scanner settings the benchmarks give SecAPI on the test bed."""
    return ScannerSettings(
        trivy_bin=str(bed.trivy_bin),
        cache_dir=bed.trivy_cache,
        offline=True,
        insecure_registries=True,
        max_concurrent_scans=max_concurrent_scans,
    )


def scanner_env(bed: Bed, *, max_concurrent_scans: int = 1) -> dict[str, str]:
    """Return `scanner_settings` as the environment variables of a SecAPI process."""
    return {
        "SECAPI_SCANNER__TRIVY_BIN": str(bed.trivy_bin),
        "SECAPI_SCANNER__CACHE_DIR": str(bed.trivy_cache),
        "SECAPI_SCANNER__OFFLINE": "true",
        "SECAPI_SCANNER__INSECURE_REGISTRIES": "true",
        "SECAPI_SCANNER__MAX_CONCURRENT_SCANS": str(max_concurrent_scans),
    }


def bare_trivy_command(bed: Bed, *, image: str, output: Path) -> list[str]:
    """Return `$TRIVY_BIN image ...` with the local executor's flags for default scan options."""
    scanner = scanner_settings(bed)
    options = ScanOptions()
    return build_scan_command(
        trivy_bin=str(bed.trivy_bin),
        image=image,
        output=output,
        options=options,
        scanner=scanner,
        cache_dir=bed.trivy_cache,
        timeout_seconds=effective_timeout(options, scanner),
    )


def go_environment(bed: Bed) -> dict[str, str]:
    """Return the GOGC and GOMEMLIMIT that the local executor gives Trivy under these settings."""
    scanner = scanner_settings(bed)
    return go_runtime_environment(
        scanner, memory_limit_bytes=local_memory_limit(scanner.max_concurrent_scans)
    )
