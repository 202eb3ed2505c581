"""A system-sized image for the overhead part, built from this machine's own files.

The fixture images are a few kilobytes, so Trivy finishes them in 80-330 ms
and fixed costs weigh heavily in a ratio. This image has the size and content
of a typical Debian-based application image: the package database of this
machine (several hundred packages) and its Python libraries, about 100 MB in
one layer, under the fixture Debian's os-release. Every run builds it with
umoci and pushes it to the test registry with skopeo. Both steps take about a
second, because skopeo skips blobs the registry already has.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.bed import Bed

REPOSITORY = "bench/system"
TAG = "1"
OS_RELEASE_DIR = Path(__file__).resolve().parent.parent / "tests/testbed/images/debian/rootfs/etc"
PACKAGE_DATABASE = Path("/var/lib/dpkg/status")
# Python libraries of the Debian system interpreter: the standard library and dist-packages.
LIBRARY_GLOB = "python3*"
LIBRARY_ROOT = Path("/usr/lib")
TOOL_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class SystemImage:
    reference: str
    # Bytes and files in the layer before compression, and the packages in its database.
    content_bytes: int
    files: int
    packages: int


def build_system_image(bed: Bed, work_dir: Path) -> SystemImage:
    """Build the image from this machine's files, push it to the bed's registry and describe it."""
    if not PACKAGE_DATABASE.is_file():
        raise RuntimeError(
            f"{PACKAGE_DATABASE} is missing: the system image needs a Debian package "
            "database; run the benchmarks on a Debian or Ubuntu machine"
        )
    libraries = sorted(path for path in LIBRARY_ROOT.glob(LIBRARY_GLOB) if path.is_dir())
    stage = work_dir / "system-image" / "rootfs"
    layout = work_dir / "system-image" / "layout"
    shutil.rmtree(stage.parent, ignore_errors=True)
    shutil.copytree(OS_RELEASE_DIR, stage / "etc")
    (stage / PACKAGE_DATABASE.parent.relative_to("/")).mkdir(parents=True)
    shutil.copy2(PACKAGE_DATABASE, stage / PACKAGE_DATABASE.relative_to("/"))
    for library in libraries:
        shutil.copytree(library, stage / library.relative_to("/"), symlinks=True)

    image = f"{layout}:{TAG}"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", image)
    _run("umoci", "insert", "--image", image, str(stage), "/")
    _run("umoci", "config", "--image", image, "--os", "linux", "--architecture", "amd64")
    reference = bed.image(f"{REPOSITORY}:{TAG}")
    _run(
        "skopeo",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        f"oci:{image}",
        f"docker://{reference}",
    )

    files = [path for path in stage.rglob("*") if path.is_file() and not path.is_symlink()]
    database = PACKAGE_DATABASE.read_text(errors="replace")
    packages = sum(line.startswith("Package: ") for line in database.splitlines())
    described = SystemImage(
        reference=reference,
        content_bytes=sum(path.stat().st_size for path in files),
        files=len(files),
        packages=packages,
    )
    shutil.rmtree(stage.parent, ignore_errors=True)
    return described


def _run(*command: str) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"building the system image failed: `{' '.join(command[:2])}` exited with "
            f"code {result.returncode}: {result.stderr.strip()[-500:]}"
        )
