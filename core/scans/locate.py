"""Find the Trivy executable the local executor runs.

Order: the configured ``trivy_bin`` (SECAPI_SCANNER__TRIVY_BIN) as a path or
a name on PATH, then the test bed's cached build of the supported version.

``python -m secapi.core.scans.locate`` prints the path it finds, or exits
with status 1 when there is none. With ``--build REPOSITORY`` it first builds
Trivy with the repository's ``tests/testbed/build_tools.py`` when none is found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

SUPPORTED_VERSION = "v0.74.0"


def cached_build() -> Path:
    """Return where tests/testbed/build_tools.py puts the supported Trivy build."""
    root = Path(os.environ.get("SECAPI_CACHE") or Path.home() / ".cache" / "secapi")
    return root / "bin" / f"trivy-{SUPPORTED_VERSION}" / "trivy"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_trivy(trivy_bin: str = "trivy") -> Path | None:
    """Return the Trivy executable to run as an absolute path, or None when there is none.

    The path is absolute because Trivy runs in a scratch folder of its own.
    """
    if os.sep in trivy_bin:
        configured = Path(trivy_bin).expanduser().absolute()
        return configured if _executable(configured) else None
    on_path = shutil.which(trivy_bin)
    if on_path is not None:
        return Path(on_path).absolute()
    cached = cached_build()
    return cached if _executable(cached) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the path of the Trivy executable.")
    parser.add_argument(
        "--build",
        metavar="REPOSITORY",
        type=Path,
        help="build Trivy with REPOSITORY/tests/testbed/build_tools.py when none is found",
    )
    arguments = parser.parse_args(argv)

    configured = os.environ.get("SECAPI_SCANNER__TRIVY_BIN", "trivy")
    found = find_trivy(configured)
    if found is None and arguments.build is not None:
        script = arguments.build / "tests" / "testbed" / "build_tools.py"
        subprocess.run([sys.executable, str(script), "trivy"], check=True)
        found = find_trivy(configured)
    if found is None:
        print(
            f"Trivy not found: {configured!r} is neither an executable path nor on PATH, and "
            f"{cached_build()} does not exist; set SECAPI_SCANNER__TRIVY_BIN or pass --build",
            file=sys.stderr,
        )
        return 1
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
