"""Build a Trivy cache folder from advisory YAML files.

The work is done by the small Go program in `tests/testbed/trivydb/`, which
writes the database with trivy-db's own storage code, so the buckets are laid
out exactly as the Trivy release under test reads them. This module builds
that program once per source version (the binary is cached outside the
repository, keyed by a hash of its sources) and runs it.

Command line, as `make trivy-db ADVISORIES=DIR OUT=DIR` calls it:

    python -m tests.testbed.trivy_db ADVISORY_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.testbed.build_tools import CACHE_ROOT

SOURCE_DIR = Path(__file__).resolve().parent / "trivydb"
BUILD_TIMEOUT_SECONDS = 900
RUN_TIMEOUT_SECONDS = 120


class TrivyDbError(RuntimeError):
    """Building the builder program or the database failed; the message names the cause."""


def build_trivy_cache(advisories: Path, out: Path) -> Path:
    """Write `out/db/trivy.db` and `out/db/metadata.json` from the YAML files in `advisories`.

    Returns `out`, the folder to pass to Trivy as `--cache-dir`.
    """
    advisories = Path(advisories)
    out = Path(out)
    if not advisories.is_dir():
        raise TrivyDbError(
            f"advisory folder {advisories} does not exist; pass a folder of advisory YAML files"
        )

    binary = builder_binary()
    result = subprocess.run(
        [str(binary), str(advisories), str(out)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise TrivyDbError(
            f"building the Trivy DB from {advisories} failed: {result.stderr.strip()}"
        )
    return out


def builder_binary() -> Path:
    """Return the built `trivydb` program, building it first if its sources changed."""
    target_dir = CACHE_ROOT / "bin" / f"trivydb-{_source_hash()}"
    binary = target_dir / "trivydb"
    if binary.is_file():
        return binary

    target_dir.parent.mkdir(parents=True, exist_ok=True)
    # Two pytest sessions may start at once; the second waits for the first build.
    with open(target_dir.parent / ".trivydb.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary
        _build(binary)
    return binary


def _source_hash() -> str:
    digest = hashlib.sha256()
    files = [SOURCE_DIR / "go.mod", SOURCE_DIR / "go.sum", *sorted(SOURCE_DIR.glob("*.go"))]
    for path in files:
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _build(binary: Path) -> None:
    go = shutil.which("go")
    if go is None:
        raise TrivyDbError(
            "the go command is not on PATH; install Go 1.25 or newer to build tests/testbed/trivydb"
        )

    env = dict(os.environ, GOTOOLCHAIN="local", CGO_ENABLED="0")
    with tempfile.TemporaryDirectory(dir=binary.parent.parent) as scratch:
        built = Path(scratch) / "trivydb"
        result = subprocess.run(
            [go, "build", "-trimpath", "-o", str(built), "."],
            cwd=SOURCE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
        )
        if result.returncode != 0:
            raise TrivyDbError(f"go build in {SOURCE_DIR} failed: {result.stderr.strip()}")
        binary.parent.mkdir(parents=True, exist_ok=True)
        # Rename last, so a present binary is always a complete one.
        os.replace(built, binary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed.trivy_db",
        description="Build a Trivy cache folder (OUT_DIR/db) from a folder of advisory YAML files.",
    )
    parser.add_argument(
        "advisories", type=Path, metavar="ADVISORY_DIR", help="folder of advisory YAML files"
    )
    parser.add_argument(
        "out",
        type=Path,
        metavar="OUT_DIR",
        help="cache folder to write; pass it to Trivy as --cache-dir",
    )
    args = parser.parse_args(argv)

    try:
        out = build_trivy_cache(args.advisories, args.out)
    except TrivyDbError as error:
        print(f"trivy-db: {error}", file=sys.stderr)
        return 1
    print(f"Trivy cache written to {out}; scan with --cache-dir {out} --skip-db-update")
    return 0


if __name__ == "__main__":
    sys.exit(main())
