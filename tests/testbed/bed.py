"""Bring the whole test bed up, check it, and take it down.

`up` reuses a bed whose every process is alive and responds to its health
check, and cleans up a dead or half-started one before it starts a new one. The independent parts
start side by side: the data services, the fixture vulnerability database and
the control plane (which first waits for the Go binaries) each run in a thread.
`.testbed/env` is written last, so its presence means a complete bed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from tests.testbed import control_plane, services, system_packages, tools
from tests.testbed.certs import Pki, create_pki, write_kubeconfig
from tests.testbed.paths import ENV_NAMES, REPO_ROOT, BedPaths
from tests.testbed.processes import (
    BedError,
    ProcessRecord,
    is_alive,
    processes_mentioning,
    stop,
)
from tests.testbed.state import (
    OWNER_CLI,
    OWNER_SESSION,
    BedState,
    add_lease,
    bed_lock,
    live_leases,
    load_state,
    remove_lease,
)

log = logging.getLogger("testbed")

_T = TypeVar("_T")

ADVISORIES = REPO_ROOT / "tests" / "testbed" / "advisories"
# Stop order: clients of a server go before the server.
STOP_ORDER = (
    "kubelet",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
    "registry",
    "redis",
    "postgres",
)


@dataclass(frozen=True)
class UpResult:
    state: BedState
    reused: bool


# --- health -----------------------------------------------------------------


def _probe(name: str, state: BedState, paths: BedPaths) -> bool:
    facts = state.facts
    if name == "postgres":
        return services.postgres_answers(facts["DATABASE_URL"])
    if name == "redis":
        return services.redis_answers(facts["REDIS_URL"])
    if name == "registry":
        return services.registry_answers(facts["SECAPI_TEST_REGISTRY"])
    if name == "etcd":
        return control_plane.etcd_answers(facts["etcd_url"])
    if name == "kube-apiserver":
        return control_plane.apiserver_answers(facts["apiserver_url"], Pki(paths.pki))
    if name == "kube-controller-manager":
        return control_plane.controller_manager_answers(state.ports[name])
    if name == "kubelet":
        return (paths.kubelet_state / "ready").exists()
    raise ValueError(f"no health probe for {name!r}")


def check_health(paths: BedPaths, state: BedState) -> dict[str, str]:
    """Return a problem description per recorded process; an empty dict means healthy."""
    problems = {}
    for name, record in state.processes.items():
        if not is_alive(record):
            problems[name] = f"process {record.pid} is gone"
            continue
        try:
            healthy = _probe(name, state, paths)
        except KeyError:
            problems[name] = "started, but never became ready"
            continue
        except Exception as error:
            problems[name] = f"health check failed: {error}"
            continue
        if not healthy:
            problems[name] = "health check failed"
    return problems


def is_live(paths: BedPaths) -> bool:
    """Tell whether a complete bed is recorded, its env file exists and every part responds."""
    state = load_state(paths)
    return bool(
        state is not None
        and state.complete
        and paths.env_file.exists()
        and not check_health(paths, state)
    )


# --- env files --------------------------------------------------------------


def write_env_file(paths: BedPaths, values: dict[str, str]) -> None:
    missing = [name for name in ENV_NAMES if name not in values]
    if missing:
        raise BedError(f"cannot write {paths.env_file}: no value for {', '.join(missing)}")
    lines = [f"export {name}={shlex.quote(values[name])}" for name in ENV_NAMES]
    temporary = paths.env_file.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("\n".join(lines) + "\n")
    temporary.replace(paths.env_file)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse the `export NAME=value` lines of an env file written by `write_env_file`."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        if len(words) != 2 or words[0] != "export" or "=" not in words[1]:
            raise BedError(f"{path}:{number}: expected `export NAME=value`, found {line!r}")
        name, value = words[1].split("=", 1)
        values[name] = value
    return values


def kubelet_overrides(*, trivy_cache: Path) -> dict[str, str]:
    """Return the variables the fake kubelet adds to every container it runs."""
    trivy_folder = tools.binary_path("trivy").parent
    return {
        "PATH": f"{trivy_folder}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "TRIVY_CACHE_DIR": str(trivy_cache),
        # Scan pods share the read-only fixture DB; the scan cache is a bbolt
        # file opened for writing, so each process keeps its own in memory.
        "TRIVY_CACHE_BACKEND": "memory",
        "TRIVY_INSECURE": "true",
        # The machine has no route out: nothing may try to download or phone home.
        "TRIVY_SKIP_DB_UPDATE": "true",
        "TRIVY_SKIP_JAVA_DB_UPDATE": "true",
        "TRIVY_SKIP_VERSION_CHECK": "true",
        "TRIVY_DISABLE_TELEMETRY": "true",
        "TRIVY_OFFLINE_SCAN": "true",
        "TRIVY_NO_PROGRESS": "true",
    }


# --- fixtures (owned by the fixtures helper) ---------------------------------


def _optional_module(name: str) -> ModuleType | None:
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ModuleNotFoundError:
        return None
    return importlib.import_module(name)


def build_fixture_db(paths: BedPaths) -> Path:
    shutil.rmtree(paths.trivy_cache, ignore_errors=True)
    paths.trivy_cache.mkdir(parents=True)
    module = _optional_module("tests.testbed.trivy_db")
    if module is None or not ADVISORIES.is_dir():
        # TODO: drop this branch once tests/testbed/trivy_db.py and advisories/ are in the tree.
        log.warning("tests/testbed/trivy_db.py or advisories/ missing; the Trivy cache is empty")
        return paths.trivy_cache
    return Path(module.build_trivy_cache(ADVISORIES, paths.trivy_cache))


def publish_fixture_images(paths: BedPaths, registry: str) -> None:
    module = _optional_module("tests.testbed.fixture_images")
    if module is None:
        # TODO: drop this branch once tests/testbed/fixture_images.py is in the tree.
        log.warning("tests/testbed/fixture_images.py missing; the registry stays empty")
        return
    # publish_images reuses layouts whose inputs did not change, so this folder outlives `down`.
    paths.image_cache.mkdir(parents=True, exist_ok=True)
    module.publish_images(registry, paths.image_cache)


# --- up ---------------------------------------------------------------------


class _Starter:
    """Start every part of one bed into `state`, timing each step."""

    def __init__(self, paths: BedPaths, state: BedState) -> None:
        self.paths = paths
        self.state = state

    def timed(self, step: str, function: Callable[[], _T]) -> _T:
        started = time.monotonic()
        result = function()
        elapsed = time.monotonic() - started
        self.state.timings[step] = round(elapsed, 2)
        log.info("%s done in %.1f s", step, elapsed)
        return result

    def record(self, record: ProcessRecord) -> None:
        self.state.add_process(self.paths, record)

    def keep(self, name: str, started: services.Started, **facts: str) -> None:
        self.state.ports[name] = started.port
        self.state.facts.update(started.facts)
        self.state.facts.update(facts)
        self.state.save(self.paths)

    def data_services(self) -> None:
        for name, start in (
            ("postgres", services.start_postgres),
            ("redis", services.start_redis),
            ("registry", services.start_registry),
        ):
            started = self.timed(name, functools.partial(start, self.paths, self.record))
            self.keep(name, started)
        registry = self.state.facts["SECAPI_TEST_REGISTRY"]
        self.timed("fixture images", lambda: publish_fixture_images(self.paths, registry))

    def fixture_db(self) -> None:
        cache = self.timed("fixture Trivy DB", lambda: build_fixture_db(self.paths))
        self.state.facts["SECAPI_TEST_TRIVY_CACHE"] = str(cache)
        self.state.save(self.paths)

    def control_plane(self, pki: Pki) -> None:
        paths = self.paths
        self.timed("Go binaries", tools.ensure_tools)
        tools.link_binaries(paths.bin)

        etcd = self.timed("etcd", lambda: control_plane.start_etcd(paths, self.record))
        self.keep("etcd", etcd, etcd_url=etcd.facts["url"])

        apiserver = self.timed(
            "kube-apiserver",
            lambda: control_plane.start_apiserver(
                paths, self.record, pki=pki, etcd_url=etcd.facts["url"]
            ),
        )
        write_kubeconfig(paths.kubeconfig, server=apiserver.facts["url"], pki=pki)
        self.keep("kube-apiserver", apiserver, apiserver_url=apiserver.facts["url"])

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="testbed") as pool:
            futures = [pool.submit(self.controller_manager)]
            if control_plane.kubelet_available():
                futures.append(pool.submit(self.kubelet))
            else:
                # TODO: drop this branch once tests/testbed/kubelet/ is in the tree.
                log.warning("tests/testbed/kubelet/ missing; pods will stay Pending")
            _raise_first(futures)

    def controller_manager(self) -> None:
        started = self.timed(
            "kube-controller-manager",
            lambda: control_plane.start_controller_manager(
                self.paths, self.record, kubeconfig=self.paths.kubeconfig
            ),
        )
        self.keep("kube-controller-manager", started)

    def kubelet(self) -> None:
        overrides = kubelet_overrides(trivy_cache=self.paths.trivy_cache)
        self.paths.kubelet_env.write_text(json.dumps(overrides, indent=2) + "\n")
        started = self.timed(
            "kubelet",
            lambda: control_plane.start_kubelet(
                self.paths, self.record, kubeconfig=self.paths.kubeconfig
            ),
        )
        self.keep("kubelet", started)


def _raise_first(futures: list[Future[None]]) -> None:
    """Wait for every future, then raise one error naming every failure."""
    errors = []
    for future in futures:
        error = future.exception()
        if error is not None:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise BedError("\n\n".join(str(error) for error in errors))


def _start(paths: BedPaths, owner: str) -> BedState:
    started = time.monotonic()
    # An env file left from an unrecorded bed must not outlive this start if it fails.
    paths.env_file.unlink(missing_ok=True)
    system_packages.ensure_packages()

    shutil.rmtree(paths.data, ignore_errors=True)
    shutil.rmtree(paths.logs, ignore_errors=True)
    paths.data.mkdir(parents=True)
    paths.logs.mkdir(parents=True)
    pki = create_pki(paths.pki)

    state = BedState(owner=owner, fingerprint=source_fingerprint())
    state.save(paths)
    starter = _Starter(paths, state)
    try:
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="testbed") as pool:
            _raise_first(
                [
                    pool.submit(starter.data_services),
                    pool.submit(starter.fixture_db),
                    pool.submit(starter.control_plane, pki),
                ]
            )
        # The trivy folder is known only after the build; the cache may be empty.
        state.facts["TRIVY_BIN"] = str(tools.binary_path("trivy"))
        state.facts["KUBECONFIG"] = str(paths.kubeconfig)
        state.facts["SECAPI_TEST_BIN"] = str(paths.bin)
        write_env_file(paths, state.facts)
    except BaseException:
        log.error("the test bed did not come up; stopping what it started (logs in %s)", paths.logs)
        _teardown(paths, state)
        raise

    state.complete = True
    state.timings["total"] = round(time.monotonic() - started, 2)
    state.save(paths)
    log.info("test bed up in %.1f s; variables in %s", state.timings["total"], paths.env_file)
    return state


def source_fingerprint() -> str:
    """Return a hash of the bed's own code and fixtures (everything in tests/testbed but tests)."""
    digest = hashlib.sha256()
    folder = REPO_ROOT / "tests" / "testbed"
    for path in sorted(folder.rglob("*")):
        if (
            not path.is_file()
            or "__pycache__" in path.parts
            or path.name.startswith(".")
            or path.name.startswith("test_")
            or path.suffix == ".md"
        ):
            continue
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class _Previous:
    """What `up` found: a bed to reuse, or the owner of one it just cleaned up."""

    reusable: BedState | None
    owner: str | None = None


def _clean_previous(paths: BedPaths, state: BedState | None) -> _Previous:
    """Return the recorded bed if it is complete, healthy and current; otherwise clean it up."""
    if state is None:
        _warn_stale_processes(paths, known=set())
        return _Previous(None)

    problems = check_health(paths, state)
    if not state.complete:
        reason = "it never finished starting"
    elif not paths.env_file.exists():
        reason = f"{paths.env_file} is gone"
    elif problems:
        reason = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
    elif state.fingerprint != source_fingerprint():
        sessions = live_leases(paths)
        if sessions:
            log.warning(
                "tests/testbed changed since the bed started, but pytest sessions %s still use "
                "it, so it is reused as it is; run `down` and `up` once they finish",
                ", ".join(map(str, sessions)),
            )
            return _Previous(state)
        # A reused bed would keep running the old fake kubelet or fixtures.
        reason = "tests/testbed changed since it started"
    else:
        return _Previous(state)

    log.warning("replacing the previous test bed (%s)", reason)
    _teardown(paths, state)
    return _Previous(None, owner=state.owner)


def up(paths: BedPaths, *, owner: str = OWNER_CLI) -> UpResult:
    """Start the bed, or reuse the recorded one when every part of it responds."""
    with bed_lock(paths):
        previous = _clean_previous(paths, load_state(paths))
        if previous.reusable is not None:
            state = previous.reusable
            if owner == OWNER_CLI and state.owner != OWNER_CLI:
                # Started by a pytest session, now requested by hand: keep it past that session.
                state.owner = OWNER_CLI
                state.save(paths)
            log.info("the test bed is already up; reusing it (variables in %s)", paths.env_file)
            return UpResult(state, reused=True)
        # A bed started by hand and replaced stays one started by hand.
        if previous.owner == OWNER_CLI:
            owner = OWNER_CLI
        return UpResult(_start(paths, owner), reused=False)


# --- down -------------------------------------------------------------------


def _teardown(paths: BedPaths, state: BedState) -> None:
    paths.env_file.unlink(missing_ok=True)
    order = [name for name in STOP_ORDER if name in state.processes]
    order += [name for name in state.processes if name not in order]
    for name in order:
        record = state.processes[name]
        if stop(record):
            log.info("stopped %s (process %d)", name, record.pid)
    for folder in (
        paths.data,
        paths.postgres_root,
        paths.trivy_cache,
        paths.kubelet_state,
        paths.bin,
    ):
        shutil.rmtree(folder, ignore_errors=True)
    for file in (paths.kubeconfig, paths.kubelet_env, paths.state_file):
        file.unlink(missing_ok=True)
    _warn_stale_processes(paths, known={record.pid for record in state.processes.values()})


def _warn_stale_processes(paths: BedPaths, *, known: set[int]) -> None:
    # A bed whose state file was deleted leaves unrecorded servers behind, so list them.
    stale = processes_mentioning(str(paths.root), exclude=known)
    stale = [process for process in stale if process.pid != os.getppid()]
    if stale:
        listing = ", ".join(f"{process.pid} ({process.name()})" for process in stale)
        log.warning(
            "processes not recorded by this bed still use %s: %s; stop them with `kill PID` "
            "if they belong to an old test bed",
            paths.root,
            listing,
        )


def down(paths: BedPaths) -> bool:
    """Stop the recorded bed and remove its data; return whether there was one."""
    with bed_lock(paths):
        state = load_state(paths)
        if state is None:
            paths.env_file.unlink(missing_ok=True)
            log.info("no test bed recorded in %s; nothing to stop", paths.state_file)
            _warn_stale_processes(paths, known=set())
            return False
        others = live_leases(paths)
        if others:
            log.warning(
                "pytest sessions %s still use this test bed; stopping it anyway",
                ", ".join(map(str, others)),
            )
        _teardown(paths, state)
        shutil.rmtree(paths.leases, ignore_errors=True)
        log.info("test bed stopped; logs kept in %s", paths.logs)
        return True


# --- pytest sessions --------------------------------------------------------


@dataclass(frozen=True)
class Testbed:
    """The running test bed as a pytest session uses it: folders and `.testbed/env` values."""

    __test__ = False  # a class named Test... is not a test case

    paths: BedPaths
    env: dict[str, str]
    started_here: bool

    @property
    def kubeconfig(self) -> Path:
        return Path(self.env["KUBECONFIG"])

    @property
    def registry(self) -> str:
        return self.env["SECAPI_TEST_REGISTRY"]

    def binary(self, name: str) -> Path:
        """Return the path of a binary in SECAPI_TEST_BIN, such as `kubectl` or `helm`."""
        return Path(self.env["SECAPI_TEST_BIN"]) / name


def join_session(paths: BedPaths) -> UpResult:
    """Bring the bed up for a pytest session (or reuse it) and take a lease on it."""
    with bed_lock(paths):
        previous = _clean_previous(paths, load_state(paths))
        if previous.reusable is not None:
            result = UpResult(previous.reusable, reused=True)
        else:
            owner = OWNER_CLI if previous.owner == OWNER_CLI else OWNER_SESSION
            result = UpResult(_start(paths, owner), reused=False)
        add_lease(paths)
        return result


def leave_session(paths: BedPaths, *, keep: bool) -> bool:
    """Drop this session's lease; stop a session-started bed when no session uses it any more.

    Return whether the bed was stopped. A bed started with `up` by hand
    (owner "cli") is never stopped here.
    """
    with bed_lock(paths):
        remove_lease(paths)
        state = load_state(paths)
        if keep or state is None or state.owner != OWNER_SESSION or live_leases(paths):
            return False
        _teardown(paths, state)
        return True


# --- status -----------------------------------------------------------------


def status(paths: BedPaths) -> tuple[bool, str]:
    """Return whether the bed is up, and a report of each part."""
    state = load_state(paths)
    if state is None:
        return False, f"no test bed recorded in {paths.state_file}; start one with `up`"
    problems = check_health(paths, state)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started_at))
    starter = "a pytest session" if state.owner == OWNER_SESSION else "`up`"
    lines = [f"test bed in {paths.root} (started {started_at} by {starter})"]
    for name, record in state.processes.items():
        port = state.ports.get(name)
        where = f"127.0.0.1:{port}" if port else "-"
        verdict = problems.get(name, "up")
        lines.append(f"  {name:<24} process {record.pid:<8} {where:<22} {verdict}")
    missing = [name for name in STOP_ORDER if name not in state.processes]
    for name in missing:
        lines.append(f"  {name:<24} not started")
    sessions = live_leases(paths)
    if sessions:
        lines.append(f"  used by pytest sessions: {', '.join(map(str, sessions))}")
    healthy = state.complete and not problems and paths.env_file.exists()
    if not state.complete:
        lines.append("  the bed did not finish starting; run `down`, then `up`")
    elif healthy:
        lines.append(f"  variables: {paths.env_file}")
    else:
        lines.append("  the bed is broken; run `up` to replace it, or `down` to stop it")
    return healthy, "\n".join(lines)
