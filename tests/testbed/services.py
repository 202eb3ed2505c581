"""PostgreSQL, Redis and the OCI registry of the test bed.

Each `start_*` function starts one server on a free loopback port, reports the
new process through `on_start` before it waits (so a failed wait still leaves
the process recorded for `down`), waits until the server responds and checks
that the listener on the port is that process and not a stale one.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
import yaml

from tests.testbed.paths import BedPaths
from tests.testbed.processes import (
    LOOPBACK,
    BedError,
    ProcessRecord,
    free_port,
    owns_port,
    run,
    spawn,
    wait_until,
)

log = logging.getLogger("testbed")

OnStart = Callable[[ProcessRecord], None]

POSTGRES_USER = "secapi"
POSTGRES_DATABASE = "secapi"
# PostgreSQL refuses to run as root, so a root-started bed runs it as this user.
POSTGRES_OS_USER = "postgres"


@dataclass(frozen=True)
class Started:
    """A server the bed started: its process, its port and the values clients need."""

    record: ProcessRecord
    port: int
    facts: dict[str, str] = field(default_factory=dict)


def _postgres_bin(name: str) -> str:
    # Debian keeps the server binaries out of PATH, in one folder per major version.
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda path: int(re.sub(r"\D", "", path.parts[-3]) or 0),
    )
    if candidates:
        return str(candidates[-1])
    found = shutil.which(name)
    if found is None:
        raise BedError(f"PostgreSQL's {name} was not found; install the Debian package postgresql")
    return found


def database_url(*, password: str, port: int) -> str:
    return f"postgresql://{POSTGRES_USER}:{password}@{LOOPBACK}:{port}/{POSTGRES_DATABASE}"


def start_postgres(paths: BedPaths, on_start: OnStart, *, timeout: float = 60) -> Started:
    root = paths.postgres_root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(mode=0o700, parents=True)
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    password = secrets.token_urlsafe(18)
    password_file = root / "password"
    password_file.write_text(password + "\n")

    os_user = None
    if os.geteuid() == 0:
        os_user = POSTGRES_OS_USER
        for path in (root, sockets, password_file):
            shutil.chown(path, user=os_user, group=os_user)

    returncode = run(
        [
            _postgres_bin("initdb"),
            f"--pgdata={data}",
            f"--username={POSTGRES_USER}",
            f"--pwfile={password_file}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        log=paths.log("postgres"),
        user=os_user,
        timeout=timeout,
    )
    if returncode != 0:
        raise BedError(f"initdb failed (exit code {returncode}); see {paths.log('postgres')}")
    password_file.unlink()

    port = free_port()
    record = spawn(
        "postgres",
        [
            _postgres_bin("postgres"),
            "-D",
            str(data),
            "-c",
            f"listen_addresses={LOOPBACK}",
            "-c",
            f"port={port}",
            "-c",
            f"unix_socket_directories={sockets}",
            # A throwaway cluster: durability costs time and buys nothing here.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ],
        log=paths.log("postgres"),
        user=os_user,
        # SIGINT is PostgreSQL's "fast shutdown"; SIGTERM would wait for clients to leave.
        stop_signal=signal.SIGINT,
    )
    on_start(record)

    def connects() -> bool:
        with psycopg.connect(
            host=LOOPBACK,
            port=port,
            user=POSTGRES_USER,
            password=password,
            dbname="postgres",
            connect_timeout=2,
            autocommit=True,
        ) as connection:
            connection.execute(f"CREATE DATABASE {POSTGRES_DATABASE}")
        return True

    wait_until(record, connects, what=f"a login on {LOOPBACK}:{port}", timeout=timeout)
    _check_owner(record, port)
    return Started(record, port, {"DATABASE_URL": database_url(password=password, port=port)})


def postgres_answers(url: str) -> bool:
    with psycopg.connect(url, connect_timeout=2) as connection:
        return connection.execute("SELECT 1").fetchone() == (1,)


def start_redis(paths: BedPaths, on_start: OnStart, *, timeout: float = 30) -> Started:
    folder = paths.data / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    record = spawn(
        "redis",
        [
            "redis-server",
            "--bind",
            LOOPBACK,
            "--port",
            str(port),
            # No snapshots and no append-only file: the bed's data is throwaway.
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
            "--daemonize",
            "no",
        ],
        log=paths.log("redis"),
    )
    on_start(record)
    url = f"redis://{LOOPBACK}:{port}/0"
    wait_until(
        record, lambda: redis_answers(url), what=f"PING on {LOOPBACK}:{port}", timeout=timeout
    )
    _check_owner(record, port)
    return Started(record, port, {"REDIS_URL": url})


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    finally:
        client.close()


def start_registry(paths: BedPaths, on_start: OnStart, *, timeout: float = 30) -> Started:
    storage = paths.data / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Debian's packaged config turns on htpasswd auth and listens on every
    # interface, so the bed writes its own: no auth, loopback only.
    config = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"{LOOPBACK}:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    config_file = paths.data / "registry.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    record = spawn(
        "registry",
        ["docker-registry", "serve", str(config_file)],
        log=paths.log("registry"),
    )
    on_start(record)
    address = f"{LOOPBACK}:{port}"
    wait_until(
        record,
        lambda: registry_answers(address) and owns_port(record, port),
        what=f"GET http://{address}/v2/ from this process",
        timeout=timeout,
    )
    return Started(record, port, {"SECAPI_TEST_REGISTRY": address})


def registry_answers(address: str) -> bool:
    """Tell whether `address` serves the Docker Registry HTTP API V2."""
    with urllib.request.urlopen(f"http://{address}/v2/", timeout=2) as response:
        return bool(
            response.status == 200
            and response.headers.get("Docker-Distribution-Api-Version") == "registry/2.0"
        )


def _check_owner(record: ProcessRecord, port: int) -> None:
    if not owns_port(record, port):
        raise BedError(
            f"another process, not the {record.name} the bed started (process {record.pid}), "
            f"listens on {LOOPBACK}:{port}; stop the stale server or run `down`, then `up` again"
        )
