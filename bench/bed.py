"""The test bed as the benchmarks see it: its variables, its cluster and throwaway databases.

`make bench` starts the bed first (`python -m tests.testbed up`); `python -m
bench` alone expects a live one and prints how to start it otherwise. Every
part that writes to PostgreSQL gets a database of its own, dropped and
created again at the start, so the benchmarks never touch the tests' data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from tests.testbed import bed
from tests.testbed.guard import check_testbed_kubeconfig
from tests.testbed.paths import BedPaths, bed_paths
from tests.testbed.state import load_state

START_HINT = "start it with `python -m tests.testbed up` (or run `make bench`, which does)"


class BedUnavailableError(RuntimeError):
    """The test bed is not running or not complete."""


@dataclass(frozen=True)
class Bed:
    """The variables of a live test bed (the contents of `.testbed/env`)."""

    paths: BedPaths
    env: dict[str, str]

    @property
    def registry(self) -> str:
        return self.env["SECAPI_TEST_REGISTRY"]

    @property
    def trivy_bin(self) -> Path:
        return Path(self.env["TRIVY_BIN"])

    @property
    def trivy_cache(self) -> Path:
        return Path(self.env["SECAPI_TEST_TRIVY_CACHE"])

    @property
    def kubeconfig(self) -> Path:
        return Path(self.env["KUBECONFIG"])

    @property
    def kubectl(self) -> Path:
        return Path(self.env["SECAPI_TEST_BIN"]) / "kubectl"

    @property
    def database_url(self) -> str:
        return self.env["DATABASE_URL"]

    def image(self, name: str) -> str:
        """Return the registry reference of a fixture image, e.g. `fixtures/alpine:3.17`."""
        return f"{self.registry}/{name}"

    def process_pid(self, name: str) -> int | None:
        """Return the process id of a part of the bed, e.g. "kube-apiserver", "etcd", "kubelet"."""
        state = load_state(self.paths)
        record = state.processes.get(name) if state else None
        return record.pid if record else None


def connect_bed() -> Bed:
    """Return the live test bed, with its variables exported to this process."""
    paths = bed_paths()
    if not paths.env_file.exists():
        raise BedUnavailableError(
            f"the test bed is not running ({paths.env_file} is missing); {START_HINT}"
        )
    state = load_state(paths)
    problems = bed.check_health(paths, state) if state else {"state.json": "is missing"}
    if problems:
        listed = "; ".join(f"{name} {problem}" for name, problem in sorted(problems.items()))
        raise BedUnavailableError(f"the test bed is not healthy ({listed}); {START_HINT}")

    env = bed.read_env_file(paths.env_file)
    os.environ.update(env)
    # The benchmarks create namespaces and Jobs: refuse any cluster but the bed's.
    check_testbed_kubeconfig(paths)
    return Bed(paths=paths, env=env)


def _database_url(base_url: str, name: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextmanager
def scratch_database(bed_: Bed, name: str) -> Iterator[str]:
    """Create an empty PostgreSQL database `name` on the bed's server; yield its URL; drop it."""
    if not re.fullmatch(r"secapi_bench_[a-z0-9_]+", name):
        raise ValueError(f"scratch database name {name!r} must match secapi_bench_[a-z0-9_]+")
    admin_url = _database_url(bed_.database_url, "postgres")

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    drop()
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _database_url(bed_.database_url, name)
    finally:
        drop()
