"""The `secapi` command: serve the API, migrate, administer users, run the operator, scan.

Exit codes: 0 on success; 1 when `scan --fail-on` found findings at or above
the threshold, or an admin command failed; 2 for a failed scan, a timeout, a
configuration error or an unreachable server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from pydantic import AliasChoices, ValidationError
from pydantic_settings import SettingsError
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from secapi import __version__
from secapi.core.audit import Actor
from secapi.core.auth import AuthService
from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.db.migrate import upgrade_to_head
from secapi.core.errors import SecapiError
from secapi.core.settings import Settings, Tier
from secapi.scan_client import add_scan_arguments

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2
DEFAULT_URL = "http://127.0.0.1:8000"
TIERS = ("free", "pro", "enterprise")
# Settings whose values a configuration error must not repeat: they may hold passwords.
SECRET_SETTINGS = frozenset({"secret_key", "database_url", "redis_url", "celery_broker_url"})
# A table of the first migration: its absence means the database has no SecAPI schema.
SCHEMA_TABLE = "users"
WRONG_DATABASE_HINT = (
    "set SECAPI_DATA_DIR or DATABASE_URL to the server's database, "
    "or run `secapi migrate` to create the schema"
)


class CliError(Exception):
    """A failure to report as one line on stderr, with the exit code to use."""

    def __init__(self, message: str, *, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        if arguments[:1] == ["operator"]:
            # argparse.REMAINDER rejects a remainder that starts with an option, such as
            # `operator --namespace x`, so the operator parses its own arguments.
            return _operator(argparse.Namespace(operator_args=arguments[1:]))
        args = build_parser().parse_args(arguments)
        code: int = args.handler(args)
    except CliError as error:
        print(f"secapi: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secapi",
        description="SecAPI: one REST API in front of Trivy, embedded or Kubernetes-native.",
    )
    parser.add_argument("--version", action="version", version=f"secapi {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the API server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (%(default)s)")
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="start without bringing the database schema to the current version first",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (%(default)s); more than 1 needs "
        "SECAPI_EXECUTOR=kubernetes and, with rate limits on, REDIS_URL",
    )
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser(
        "migrate", help="bring the database schema to the current version"
    )
    migrate.set_defaults(handler=_migrate)

    admin = commands.add_parser("admin", help="administer users")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    set_tier = admin_commands.add_parser("set-tier", help="set a user's tier")
    set_tier.add_argument("email")
    set_tier.add_argument("tier", choices=TIERS)
    set_tier.set_defaults(handler=_set_tier)
    create_user = admin_commands.add_parser(
        "create-user", help="create a user and print its first API key (shown once)"
    )
    create_user.add_argument("email")
    create_user.add_argument("--tier", choices=TIERS, default="free")
    create_user.set_defaults(handler=_create_user)

    # No -h of its own: every argument, --help included, goes to the operator's parser.
    operator = commands.add_parser(
        "operator",
        help="run the Kubernetes operator against the current kubeconfig",
        add_help=False,
    )
    operator.add_argument("operator_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    operator.set_defaults(handler=_operator)

    scan = commands.add_parser(
        "scan",
        help="scan an image through a SecAPI server, for CI pipelines",
        description="Submit a scan; with --wait, poll until it ends and exit 1 when findings "
        "reach the --fail-on severity, 2 when the scan failed or the server could not be used.",
    )
    add_scan_arguments(scan)
    return parser


def load_settings() -> Settings:
    """Return the settings from the environment, or raise CliError saying what is wrong."""
    try:
        return Settings()
    except ValidationError as error:
        problems = [_describe_setting_error(item) for item in error.errors()]
        raise CliError("invalid configuration: " + "; ".join(problems)) from None
    except SettingsError as error:
        # Raised for a list or mapping variable that is not JSON; the field is named in quotes.
        found = re.search(r'field "([^"]+)"', str(error))
        variable = _setting_variable([found.group(1)]) if found else "a list or mapping variable"
        raise CliError(
            f"invalid configuration: {variable} is not valid JSON; write a list as "
            '["first", "second"] and a mapping as {"key": "value"}'
        ) from None


def _describe_setting_error(item: Mapping[str, Any]) -> str:
    """Return one settings error as the variable, the value given (unless secret) and the rule.

    Settings-wide checks have no location, and their messages name the variables.
    """
    message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
    if item.get("type") == "bool_parsing":
        message += "; use true or false"
    location = [str(part) for part in item.get("loc", ())]
    if not location:
        return message
    variable = _setting_variable(location)
    value = item.get("input")
    field = _ALIASES.get(location[0], location[0])
    if field in SECRET_SETTINGS or not isinstance(value, str):
        return f"{variable} is invalid: {message}"
    return f"{variable}={value!r} is invalid: {message}"


def _setting_variable(location: Sequence[str]) -> str:
    """Return the environment variable that sets the field at ``location``.

    A field with aliases (DATABASE_URL, ENVIRONMENT, ...) is located by the alias itself.
    """
    if len(location) == 1 and location[0] in _ALIASES:
        return location[0]
    return "SECAPI_" + "__".join(part.upper() for part in location)


def _alias_fields() -> dict[str, str]:
    """Return the field name of every alias that sets a top-level setting."""
    aliases = {}
    for name, field in Settings.model_fields.items():
        if isinstance(field.validation_alias, AliasChoices):
            for choice in field.validation_alias.choices:
                aliases[str(choice)] = name
    return aliases


_ALIASES = _alias_fields()


def configure_logging(*, json_logs: bool) -> None:
    """Send structlog's and the standard library's records to stderr, one line each."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json_logs
        # Colour codes only on a terminal, so a log written to a file stays plain text.
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def run_migrations(settings: Settings) -> None:
    try:
        upgrade_to_head(settings)
    except Exception as error:
        # The driver's message can hold the database URL with its password: name the class only.
        raise CliError(
            f"database migration failed ({type(error).__name__}); check DATABASE_URL "
            "and that the database server is reachable"
        ) from None


def check_workers(settings: Settings, workers: int) -> None:
    """Raise CliError when ``workers`` server processes cannot share this configuration."""
    if workers < 1:
        raise CliError(f"--workers {workers} is invalid: use 1 or more")
    if workers == 1:
        return
    if settings.executor == "local":
        raise CliError(
            f"--workers {workers} cannot be used with the local executor: each process would "
            f"run its own pool of {settings.scanner.max_concurrent_scans} Trivy processes "
            "(SECAPI_SCANNER__MAX_CONCURRENT_SCANS); use --workers 1, or "
            "SECAPI_EXECUTOR=kubernetes"
        )
    if settings.rate_limit_enabled and not settings.redis_url:
        raise CliError(
            f"--workers {workers} needs REDIS_URL while rate limits are on: without Redis each "
            "process counts requests on its own, which multiplies every limit by the number "
            "of processes; set REDIS_URL, or use --workers 1"
        )


def check_port_free(host: str, port: int) -> None:
    """Raise CliError when ``host:port`` cannot be bound.

    uvicorn binds only after the app has started, so without this check a second
    server on a busy port would start its scan workers on the shared database first.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise CliError(
                f"cannot listen on {host}:{port}: {error.strerror or error}; stop the process "
                "that uses the port or choose another with --port (make dev PORT=18000)"
            ) from None


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(json_logs=settings.is_production)
    check_workers(settings, args.workers)
    if not args.no_migrate:
        run_migrations(settings)

    # Imported here so that the other commands start without loading the web stack.
    import uvicorn

    from secapi.api.app import create_app

    try:
        app = create_app(settings, end_waits_on_stop_signals=True)
    except ValueError as error:
        raise CliError(f"invalid configuration: {error}") from None
    check_port_free(args.host, args.port)
    # proxy_headers=False: the API itself decides whom to believe about X-Forwarded-For,
    # from SECAPI_TRUSTED_PROXIES, for the audit trail and the per-address limits.
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, proxy_headers=False, log_config=None)
        return EXIT_OK
    # Several processes need an import string; each builds its app from the same environment.
    uvicorn.run(
        "secapi.api.app:create_served_app",
        factory=True,
        workers=args.workers,
        host=args.host,
        port=args.port,
        proxy_headers=False,
        log_config=None,
    )
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(json_logs=settings.is_production)
    run_migrations(settings)
    print("the database schema is at the current version")
    return EXIT_OK


def _set_tier(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(json_logs=settings.is_production)

    async def change() -> None:
        async with _session(settings) as session:
            await AuthService(session, settings).set_tier(
                email=args.email, tier=Tier(args.tier), actor=_admin_actor()
            )

    try:
        asyncio.run(change())
    except SecapiError as error:
        raise CliError(error.message, exit_code=1) from None
    print(f"{args.email} is now on the {args.tier} tier")
    return EXIT_OK


def _create_user(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(json_logs=settings.is_production)

    async def create() -> tuple[str, str]:
        async with _session(settings) as session:
            user, issued = await AuthService(session, settings).register(
                email=args.email, source_ip=None, tier=Tier(args.tier)
            )
            return user.id, issued.key

    try:
        user_id, key = asyncio.run(create())
    except SecapiError as error:
        raise CliError(error.message, exit_code=1) from None
    print(f"user_id: {user_id}")
    print(f"api_key: {key}")
    print("store the API key now: it is shown only this once", file=sys.stderr)
    return EXIT_OK


def _operator(args: argparse.Namespace) -> int:
    load_settings()
    # Imported here so that only the operator loads Kopf and the Kubernetes client.
    from secapi.operator.main import run

    result = run(list(args.operator_args))
    return int(result or 0)


def _admin_actor() -> Actor:
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
    return Actor(user_id=None, name=f"cli:{user}", source_ip=None)


def describe_database(settings: Settings) -> str:
    """Name the configured database for messages: the SQLite file, or the URL without password."""
    url = make_url(settings.sqlalchemy_url())
    if url.get_backend_name() == "sqlite":
        return f"the SQLite file {url.database}"
    return url.render_as_string(hide_password=True)


def _require_sqlite_file(settings: Settings) -> None:
    url = make_url(settings.sqlalchemy_url())
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    if not Path(url.database).is_file():
        raise CliError(f"{describe_database(settings)} does not exist: {WRONG_DATABASE_HINT}")


@asynccontextmanager
async def _session(settings: Settings) -> AsyncIterator[AsyncSession]:
    """Yield one session on an existing, migrated database, disposing of the engine at the end.

    Admin commands never create a database: SQLite would create an empty file
    at a mistyped SECAPI_DATA_DIR, and the command would then fail on the
    missing tables instead of saying which database it opened.
    """
    name = describe_database(settings)
    _require_sqlite_file(settings)

    engine = create_engine(settings)
    try:
        try:
            async with engine.connect() as connection:
                migrated = await connection.run_sync(
                    lambda sync: inspect(sync).has_table(SCHEMA_TABLE)
                )
        except DBAPIError as error:
            # The driver's message can hold the URL with its password: name the class only.
            raise CliError(
                f"cannot open {name} ({type(error.orig).__name__}); check DATABASE_URL "
                "and that the database server is running"
            ) from None
        if not migrated:
            raise CliError(f"{name} has no SecAPI schema: {WRONG_DATABASE_HINT}")

        async with create_session_factory(engine)() as session:
            yield session
    finally:
        await engine.dispose()
