"""Start, identify, wait for and stop the test bed's server processes.

Each server runs in its own session, so it leads a process group that `down`
signals as a whole. A process is recorded with its id and its start time: a
recorded id that now belongs to another process (ids are reused) is treated as
dead and never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

LOOPBACK = "127.0.0.1"


class BedError(RuntimeError):
    """A test bed step failed; the message names the step and what to do next."""


@dataclass(frozen=True)
class ProcessRecord:
    """A server process the bed started."""

    name: str
    pid: int
    create_time: float
    log: str
    stop_signal: int = signal.SIGTERM

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(
            name=data["name"],
            pid=int(data["pid"]),
            create_time=float(data["create_time"]),
            log=data["log"],
            stop_signal=int(data.get("stop_signal", signal.SIGTERM)),
        )


# Popen objects of the servers this process started, kept so that they are
# reaped when stopped (and Popen does not warn that they still run).
_children: dict[int, subprocess.Popen[bytes]] = {}

_reserved_ports: set[int] = set()
_reserved_lock = threading.Lock()


def free_port() -> int:
    """Return a loopback TCP port that is free now and not handed out before.

    NOTE: another program may still take the port before our server binds it;
    every start therefore checks that the listener belongs to the new process.
    """
    with _reserved_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port = int(sock.getsockname()[1])
            if port not in _reserved_ports:
                _reserved_ports.add(port)
                return port
    raise BedError("found no free TCP port on 127.0.0.1 after 100 tries")


def spawn(
    name: str,
    args: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
) -> ProcessRecord:
    """Start `args` in a new session with stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as log_file:
        log_file.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(args)}\n".encode())
        log_file.flush()
        try:
            process = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                user=user,
                group=user,
                extra_groups=[] if user else None,
            )
        except OSError as error:
            raise BedError(f"{name}: could not run {args[0]}: {error}") from error
    _children[process.pid] = process
    return ProcessRecord(
        name=name,
        pid=process.pid,
        create_time=psutil.Process(process.pid).create_time(),
        log=str(log),
        stop_signal=stop_signal,
    )


def run(
    args: Sequence[str],
    *,
    log: Path,
    user: str | None = None,
    timeout: float,
) -> int:
    """Run `args` to completion with its output appended to `log`; return its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as log_file:
        log_file.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(args)}\n".encode())
        log_file.flush()
        try:
            result = subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                user=user,
                group=user,
                extra_groups=[] if user else None,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BedError(f"{args[0]} failed: {error}") from error
    return result.returncode


def find_process(record: ProcessRecord) -> psutil.Process | None:
    """Return the live process of `record`, or None when it exited or its id was reused."""
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.create_time) > 0.01:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.NoSuchProcess:
        return None


def is_alive(record: ProcessRecord) -> bool:
    return find_process(record) is not None


def listener_pids(port: int) -> set[int]:
    """Return the ids of processes listening on TCP `port` of any local address."""
    pids = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is not None:
                pids.add(conn.pid)
    return pids


def owns_port(record: ProcessRecord, port: int) -> bool:
    """Tell whether `record`'s process (or one of its children) listens on `port`."""
    process = find_process(record)
    if process is None:
        return False
    family = {process.pid}
    with contextlib.suppress(psutil.Error):
        family |= {child.pid for child in process.children(recursive=True)}
    return bool(listener_pids(port) & family)


def tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    record: ProcessRecord,
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    interval: float = 0.1,
) -> None:
    """Poll `check` until it returns true; fail early when the process exits.

    Exceptions raised by `check` count as "not yet", so a server that still
    refuses connections is polled again.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if check():
                return
        except Exception as error:
            last_error = error
        if not is_alive(record):
            raise BedError(
                f"{record.name} exited before it was ready ({what}); "
                f"last lines of {record.log}:\n{tail(record.log)}"
            )
        if time.monotonic() > deadline:
            detail = f"; last error: {last_error}" if last_error else ""
            raise BedError(
                f"{record.name} was not ready after {timeout:.0f} s ({what}{detail}); "
                f"last lines of {record.log}:\n{tail(record.log)}"
            )
        time.sleep(interval)
        interval = min(interval * 1.5, 1.0)


def stop(record: ProcessRecord, *, timeout: float = 15.0) -> bool:
    """Stop `record`'s process group and every descendant; return whether it was alive.

    The descendants are collected first, because a server's workers (or the
    fake kubelet's pod processes) may have left the group.
    """
    process = find_process(record)
    if process is None:
        return False
    try:
        family = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [process]

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, record.stop_signal)
    for member in family[1:]:
        # Group members already got the server's own stop signal.
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(member.pid) != record.pid:
                member.send_signal(signal.SIGTERM)

    still_running = _wait_gone(family, timeout=timeout)
    for member in still_running:
        with contextlib.suppress(psutil.Error):
            member.kill()
    _wait_gone(still_running, timeout=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signal.SIGKILL)
    child = _children.pop(record.pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
    return True


def _has_exited(process: psutil.Process) -> bool:
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _wait_gone(processes: list[psutil.Process], *, timeout: float) -> list[psutil.Process]:
    """Wait until every process exited; return those still running after `timeout`.

    A zombie counts as exited: the servers of a bed started by an earlier
    command are orphans, and their new parent may reap them late.
    """
    deadline = time.monotonic() + timeout
    running = list(processes)
    while running and time.monotonic() < deadline:
        running = [process for process in running if not _has_exited(process)]
        if running:
            time.sleep(0.05)
    return running


def processes_mentioning(text: str, *, exclude: set[int]) -> list[psutil.Process]:
    """Return live processes whose command line contains `text` (for stale-process hints)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid in exclude or process.pid == os.getpid():
            continue
        cmdline = process.info.get("cmdline") or []
        if any(text in part for part in cmdline):
            found.append(process)
    return found
