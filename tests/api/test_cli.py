"""The `secapi` command: startup checks, migrate and the admin commands, run as processes."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from secapi.cli import _describe_setting_error
from secapi.core.settings import Settings
from tests.api.conftest import (
    SECAPI,
    TEST_SECRET_KEY,
    ClientFactory,
    Database,
    new_email,
    register,
    start_server,
    stop_server,
)
from tests.testbed.bed import Testbed

# Variables a developer's shell or the test bed may have set, which would change the outcome.
CONFIG_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "SECRET_KEY",
    "ENVIRONMENT",
    "RATE_LIMIT_ENABLED",
    "CELERY_BROKER_URL",
)


def run_secapi(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {
        name: value
        for name, value in os.environ.items()
        if name not in CONFIG_VARIABLES and not name.startswith("SECAPI_")
    }
    return subprocess.run(
        [SECAPI, *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("secret_key", "problem"),
    [(None, "missing or a placeholder"), ("changeme", "placeholder"), ("short-key", "shorter")],
)
def test_production_rejects_weak_secret_key(
    tmp_path: Path, secret_key: str | None, problem: str
) -> None:
    env = {"ENVIRONMENT": "production", "SECAPI_DATA_DIR": str(tmp_path)}
    if secret_key is not None:
        env["SECRET_KEY"] = secret_key

    result = run_secapi("serve", "--port", "1", env=env)

    assert result.returncode == 2
    assert "SECRET_KEY" in result.stderr
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    if secret_key is not None:
        assert secret_key not in result.stderr


def test_migrate_creates_sqlite_schema(tmp_path: Path) -> None:
    database = tmp_path / "fresh.db"
    env = {"DATABASE_URL": f"sqlite:///{database}", "SECAPI_DATA_DIR": str(tmp_path)}

    result = run_secapi("migrate", env=env)

    assert result.returncode == 0, result.stderr
    assert "current version" in result.stdout
    assert database.exists()


def test_migrate_reports_unreachable_database(tmp_path: Path) -> None:
    url = "postgresql://secapi:hunter2-password@127.0.0.1:9/secapi"
    result = run_secapi("migrate", env={"DATABASE_URL": url}, timeout=120)

    assert result.returncode == 2
    assert "database migration failed" in result.stderr
    assert "hunter2-password" not in result.stderr
    assert "Traceback" not in result.stderr


async def test_admin_set_tier(client: httpx.AsyncClient, database: Database) -> None:
    account = await register(client)
    env = {"DATABASE_URL": database.url, "SECRET_KEY": TEST_SECRET_KEY}

    result = run_secapi("admin", "set-tier", account.email.upper(), "pro", env=env)

    assert result.returncode == 0, result.stderr
    me = await client.get("/api/v1/auth/me", headers=account.headers)
    assert me.json()["tier"] == "pro"
    events = (await client.get("/api/v1/audit", headers=account.headers)).json()["items"]
    change = events[0]
    assert change["action"] == "user.tier_change"
    assert change["details"] == {"from": "free", "to": "pro"}
    assert change["actor"].startswith("cli:")


def test_admin_set_tier_unknown_user(database: Database) -> None:
    env = {"DATABASE_URL": database.url, "SECRET_KEY": TEST_SECRET_KEY}

    result = run_secapi("admin", "set-tier", "nobody@example.com", "pro", env=env)

    assert result.returncode == 1
    assert "nobody@example.com" in result.stderr


def test_admin_rejects_missing_sqlite_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "wrong-data-dir"
    env = {"SECAPI_DATA_DIR": str(data_dir), "SECRET_KEY": TEST_SECRET_KEY}

    result = run_secapi("admin", "set-tier", "someone@example.com", "pro", env=env)

    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(data_dir / "secapi.db") in result.stderr
    assert "does not exist" in result.stderr
    assert "SECAPI_DATA_DIR" in result.stderr
    assert "secapi migrate" in result.stderr
    assert not (data_dir / "secapi.db").exists()


def test_admin_rejects_sqlite_without_schema(tmp_path: Path) -> None:
    empty = tmp_path / "secapi.db"
    empty.touch()
    env = {"SECAPI_DATA_DIR": str(tmp_path), "SECRET_KEY": TEST_SECRET_KEY}

    result = run_secapi("admin", "set-tier", "someone@example.com", "pro", env=env)

    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(empty) in result.stderr
    assert "no SecAPI schema" in result.stderr
    assert "secapi migrate" in result.stderr


def test_admin_rejects_postgresql_without_schema(testbed: Testbed) -> None:
    admin_url = make_url(testbed.env["DATABASE_URL"])
    name = f"secapi_empty_{uuid.uuid4().hex[:12]}"
    # A password the server does not check is enough to tell whether it leaks.
    password = admin_url.password or "unused-password"
    url = admin_url.set(database=name, password=password).render_as_string(hide_password=False)
    admin = admin_url.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        env = {"DATABASE_URL": url, "SECRET_KEY": TEST_SECRET_KEY}
        result = run_secapi("admin", "create-user", new_email(), env=env)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert name in result.stderr
    assert "no SecAPI schema" in result.stderr
    assert password not in result.stderr


def test_admin_set_tier_rejects_unknown_tier(database: Database) -> None:
    env = {"DATABASE_URL": database.url, "SECRET_KEY": TEST_SECRET_KEY}

    result = run_secapi("admin", "set-tier", "someone@example.com", "platinum", env=env)

    assert result.returncode == 2
    assert "platinum" in result.stderr


async def test_admin_create_user(make_client: ClientFactory, database: Database) -> None:
    email = new_email("created")
    env = {"DATABASE_URL": database.url, "SECRET_KEY": TEST_SECRET_KEY}

    result = run_secapi("admin", "create-user", email, "--tier", "enterprise", env=env)

    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    client = await make_client()
    me = await client.get("/api/v1/auth/me", headers={"X-API-Key": lines["api_key"]})
    assert me.status_code == 200
    assert me.json()["email"] == email
    assert me.json()["tier"] == "enterprise"

    again = run_secapi("admin", "create-user", email, env=env)
    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_serve_rejects_busy_port(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'secapi.db'}", "SECAPI_DATA_DIR": str(tmp_path)}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        result = run_secapi("serve", "--host", "127.0.0.1", "--port", str(port), env=env)

    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr
    # It stopped before the app started, so no scan worker ran.
    assert "local executor started" not in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_rejects_bad_trusted_proxy(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'secapi.db'}",
        "SECAPI_DATA_DIR": str(tmp_path),
        "SECAPI_TRUSTED_PROXIES": '["10.0.0.0/8", "proxy.internal"]',
    }

    result = run_secapi("serve", "--port", "1", env=env)

    assert result.returncode == 2
    assert "'proxy.internal'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://:redis-password@127.0.0.1:notaport/0",
        "redis://:redis-pass/word@127.0.0.1:6379/0",
    ],
)
def test_unparsable_redis_url_hides_password(tmp_path: Path, url: str) -> None:
    env = {"SECAPI_DATA_DIR": str(tmp_path), "REDIS_URL": url}

    result = run_secapi("serve", "--port", "1", env=env)

    assert result.returncode == 2
    assert "REDIS_URL is invalid" in result.stderr
    assert "redis-pass" not in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_rejects_bad_redis_url(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'secapi.db'}",
        "SECAPI_DATA_DIR": str(tmp_path),
        "REDIS_URL": "http://user:redis-password@127.0.0.1:6379/0",
    }

    result = run_secapi("serve", "--port", "1", env=env)

    assert result.returncode == 2
    assert "REDIS_URL must start with redis://" in result.stderr
    assert "redis-password" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SECAPI_SCANNER__GO_MEMORY_LIMIT_BYTES", "1000", "less than the minimum of 67108864"),
        ("SECAPI_SCANNER__GO_MEMORY_LIMIT_BYTES", "2GiB", "not a whole number"),
        ("SECAPI_SCANNER__GO_GC_PERCENT", "off", "a percent from 10 to 100000"),
        ("SECAPI_SCANNER__GO_GC_PERCENT", "5", "from 10 to 100000"),
        ("ENVIRONMENT", "staging", "'development' or 'production'"),
        ("RATE_LIMIT_ENABLED", "maybe", "use true or false"),
    ],
)
def test_invalid_setting_names_variable_and_value(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    env = {"SECAPI_DATA_DIR": str(tmp_path), variable: value}

    result = run_secapi("serve", "--port", "1", env=env)

    assert result.returncode == 2
    assert f"{variable}={value!r} is invalid" in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://secapi:db-password@127.0.0.1:notaport/secapi", "port is not a number"),
        ("db-password", "not a database URL"),
    ],
)
def test_invalid_database_url_hides_password(tmp_path: Path, url: str, expected: str) -> None:
    env = {"SECAPI_DATA_DIR": str(tmp_path), "DATABASE_URL": url}

    result = run_secapi("migrate", env=env)

    assert result.returncode == 2
    assert "DATABASE_URL is invalid" in result.stderr
    assert expected in result.stderr
    assert "db-password" not in result.stderr
    assert "Traceback" not in result.stderr


def test_list_setting_that_is_not_json(tmp_path: Path) -> None:
    env = {"SECAPI_DATA_DIR": str(tmp_path), "SECAPI_TRUSTED_PROXIES": "10.0.0.0/8"}

    result = run_secapi("serve", "--port", "1", env=env)

    assert result.returncode == 2
    assert "SECAPI_TRUSTED_PROXIES is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("location", "variable"),
    [
        (("SECRET_KEY",), "SECRET_KEY"),
        (("DATABASE_URL",), "DATABASE_URL"),
        (("redis_url",), "SECAPI_REDIS_URL"),
    ],
)
def test_invalid_secret_setting_hides_value(location: tuple[str, ...], variable: str) -> None:
    error = {"loc": location, "msg": "Input is invalid", "input": "postgresql://u:hunter2@db/x"}

    message = _describe_setting_error(error)

    assert message == f"{variable} is invalid: Input is invalid"


def test_serve_workers_refuse_the_local_executor(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'secapi.db'}",
        "SECAPI_DATA_DIR": str(tmp_path),
        "SECAPI_EXECUTOR": "local",
    }

    result = run_secapi("serve", "--port", "1", "--workers", "2", env=env)

    assert result.returncode == 2
    assert "--workers 2 cannot be used with the local executor" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "secapi.db").exists(), "nothing should start, not even migrations"


def test_serve_workers_need_redis_for_rate_limits(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'secapi.db'}",
        "SECAPI_DATA_DIR": str(tmp_path),
        "SECAPI_EXECUTOR": "kubernetes",
        "RATE_LIMIT_ENABLED": "true",
    }

    result = run_secapi("serve", "--port", "1", "--workers", "3", env=env)

    assert result.returncode == 2
    assert "--workers 3 needs REDIS_URL" in result.stderr

    result = run_secapi("serve", "--port", "1", "--workers", "0", env=env)
    assert result.returncode == 2
    assert "--workers 0 is invalid" in result.stderr


async def test_ignored_celery_setting_logged(
    make_client: ClientFactory,
    make_settings: Callable[..., Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    await make_client(make_settings(celery_broker_url="redis://127.0.0.1:9/0"))

    output = capsys.readouterr().out
    assert "CELERY_BROKER_URL is set but ignored" in output


def test_operator_reports_bad_settings(tmp_path: Path) -> None:
    env = {"ENVIRONMENT": "production", "SECAPI_DATA_DIR": str(tmp_path)}

    result = run_secapi("operator", "--namespace", "scans", env=env)

    assert result.returncode == 2
    assert "SECRET_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_redis_warns_at_startup(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'secapi.db'}",
        secret_key=TEST_SECRET_KEY,
        data_dir=tmp_path,
        redis_url=f"redis://:redis-password@127.0.0.1:{closed_port}/0",
    )
    log_path = tmp_path / "server.log"
    server = start_server(settings, log_path)
    try:
        ready = httpx.get(f"{server.url}/ready", timeout=10)
    finally:
        stop_server(server)

    log = log_path.read_text()
    assert "redis is unreachable, so rate limits are not enforced" in log
    assert "redis-password" not in log
    assert ready.status_code == 503
