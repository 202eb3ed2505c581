"""Where the test bed keeps its state, logs and data.

Everything of one bed lives under one folder, `<repo>/.testbed/` unless
`SECAPI_TESTBED_DIR` names another. Only PostgreSQL's data folder lives
elsewhere, under the system temporary folder, because PostgreSQL runs as the
`postgres` user when the bed is started by root and that user must own it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# The seven variables of `.testbed/env`, in the order they are written.
ENV_NAMES = (
    "DATABASE_URL",
    "REDIS_URL",
    "SECAPI_TEST_REGISTRY",
    "TRIVY_BIN",
    "SECAPI_TEST_TRIVY_CACHE",
    "KUBECONFIG",
    "SECAPI_TEST_BIN",
)


@dataclass(frozen=True)
class BedPaths:
    """The files and folders of one test bed."""

    root: Path

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def leases(self) -> Path:
        """One file per pytest session that uses the bed, named by its process id."""
        return self.root / "leases"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def data(self) -> Path:
        """Data of the running bed (etcd, registry storage, certificates); removed by `down`."""
        return self.root / "data"

    @property
    def image_cache(self) -> Path:
        """Fixture image layouts, reused across restarts; `down` keeps this folder."""
        return self.root / "cache" / "images"

    @property
    def pki(self) -> Path:
        return self.data / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def trivy_cache(self) -> Path:
        return self.root / "trivy-cache"

    @property
    def kubelet_state(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_env(self) -> Path:
        return self.root / "kubelet-env.json"

    @property
    def postgres_root(self) -> Path:
        # Keyed by the bed folder, so two checkouts on one machine never share it.
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"secapi-testbed-{digest}"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def bed_paths() -> BedPaths:
    """Return the paths of the bed named by `SECAPI_TESTBED_DIR`, else `<repo>/.testbed`."""
    override = os.environ.get("SECAPI_TESTBED_DIR")
    root = Path(override) if override else REPO_ROOT / ".testbed"
    return BedPaths(root=root.resolve())
