"""Start and stop the processes the benchmarks measure: `secapi serve`, the bare app, the operator.

Each runs as a subprocess with its output in a log file of the scratch
folder, bound to 127.0.0.1, and is stopped by its own process id.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench.context import say

REPO_ROOT = Path(__file__).resolve().parents[1]
SECAPI = str(Path(sys.executable).with_name("secapi"))
# Settings every SecAPI process of the benchmarks gets: no rate limits (the load
# generators would hit them first) and a fixed secret key.
COMMON_ENV = {
    "RATE_LIMIT_ENABLED": "false",
    "ENVIRONMENT": "development",
    "SECRET_KEY": "bench-secret-key-0123456789abcdef0123456789",
}


# Folder for cProfile output of the SecAPI processes, set by `python -m bench --profile`.
_profile_dir: Path | None = None


def enable_profiling(directory: Path) -> None:
    """Run every later `secapi` subprocess under cProfile, writing `directory/<name>.prof`."""
    global _profile_dir
    directory.mkdir(parents=True, exist_ok=True)
    _profile_dir = directory


def _secapi_command(name: str, args: Sequence[str]) -> list[str]:
    if _profile_dir is None:
        return [SECAPI, *args]
    # cProfile writes its file when the process ends normally, as SIGINT makes both
    # uvicorn and Kopf do. It profiles the main thread, where the event loop runs.
    output = _profile_dir / f"{name}.prof"
    return [sys.executable, "-m", "cProfile", "-o", str(output), SECAPI, *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A subprocess the benchmarks started, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def start_process(
    name: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    work_dir: Path,
    port: int | None = None,
    cwd: Path | None = None,
) -> Service:
    """Start `args` with its output in `work_dir/<name>.log`."""
    log_path = work_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(args),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd or work_dir,
            start_new_session=True,
        )
    return Service(name=name, process=process, log_path=log_path, port=port)


def wait_for_http(service: Service, path: str, *, timeout: float = 60.0) -> None:
    """Wait until GET `path` returns 200, or raise with the end of the service's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"{service.name} exited with code {service.process.returncode} before it "
                f"responded; its log ends with:\n{service.log_tail()}"
            )
        try:
            if httpx.get(service.url + path, timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    service.stop()
    raise RuntimeError(
        f"{service.name} did not respond to GET {path} within {timeout:g} s; its log ends with:\n"
        f"{service.log_tail()}"
    )


def secapi_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Return this process's environment with the common settings and `extra` on top."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SECAPI_")}
    # The scan client's and the tests' variables must not leak into the server's settings.
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(COMMON_ENV)
    env.update(extra)
    return env


def start_secapi(name: str, *, env: Mapping[str, str], work_dir: Path, workers: int = 1) -> Service:
    """Start `secapi serve` on a free loopback port and wait until /ready returns 200."""
    port = free_port()
    if _profile_dir is not None and workers > 1:
        # cProfile sees only the process it starts, not uvicorn's worker processes.
        say(f"{name}: profiling, so 1 worker process instead of {workers}")
        workers = 1
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    service = start_process(
        name,
        _secapi_command(name, args),
        env=env,
        work_dir=work_dir,
        port=port,
    )
    wait_for_http(service, "/ready", timeout=120)
    say(f"{name}: secapi serve answers on {service.url}")
    return service


def start_bare_app(
    name: str,
    *,
    document: Path,
    work_dir: Path,
    workers: int = 1,
    database_url: str | None = None,
    namespace: str | None = None,
    trivy_command: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Service:
    """Start the bare FastAPI app (bench/bare_app.py), served as `secapi serve` serves.

    With `database_url` and `namespace`, it also serves the endpoint that stores each
    submission (a PostgreSQL row and a Scan resource). With `trivy_command`, it also
    serves the endpoints that run Trivy per submission, and the Trivy processes inherit
    `extra_env` with the rest of the app's environment.
    """
    port = free_port()
    options: list[str] = []
    if database_url and namespace:
        options = ["--database-url", database_url, "--namespace", namespace]
    if trivy_command:
        options += ["--trivy-command", json.dumps(trivy_command)]
    service = start_process(
        name,
        [
            sys.executable,
            "-m",
            "bench.bare_app",
            "--port",
            str(port),
            "--document",
            str(document),
            "--workers",
            str(workers),
            *options,
        ],
        env={**os.environ, **(extra_env or {})},
        work_dir=work_dir,
        port=port,
        # `-m` finds the bench package in the current folder. PYTHONPATH would not do:
        # it puts the repository's operator/ folder ahead of the standard library's operator.
        cwd=REPO_ROOT,
    )
    wait_for_http(service, "/health")
    say(f"{name}: bare app answers on {service.url}")
    return service


class RssSampler:
    """Sample the resident memory of one process every `interval` seconds, in a thread."""

    def __init__(self, pid: int, *, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._sample, name=f"rss-{pid}", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            process = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._finished.is_set():
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            self.samples += 1
            self._finished.wait(self.interval)

    def finish(self) -> int:
        """Stop sampling and return the peak resident memory seen, in bytes."""
        self._finished.set()
        self._thread.join(5)
        return self.peak_bytes


def migrate(env: Mapping[str, str]) -> None:
    """Run `secapi migrate` with `env` (its DATABASE_URL names the database)."""
    result = subprocess.run([SECAPI, "migrate"], env=dict(env), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"secapi migrate failed: {result.stderr[-1000:]}")


def start_operator(
    name: str, *, namespace: str, env: Mapping[str, str], work_dir: Path, timeout: float = 60.0
) -> Service:
    """Start `secapi operator --namespace NS` and wait until its reconcile loop runs."""
    service = start_process(
        name,
        _secapi_command(name, ["operator", "--namespace", namespace]),
        env=env,
        work_dir=work_dir,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {service.process.returncode}; its log ends with:\n"
                f"{service.log_tail()}"
            )
        if "reconcile loop started" in service.log_path.read_text(errors="replace"):
            say(f"{name}: secapi operator runs (process {service.process.pid})")
            return service
        time.sleep(0.1)
    service.stop()
    raise RuntimeError(
        f"{name} did not start its reconcile loop within {timeout:g} s:\n{service.log_tail()}"
    )
