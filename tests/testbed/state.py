"""The bed's record of what it started (`state.json`), its lock and its session leases.

`state.json` is rewritten after every process start, so a bed that crashed
half-way still names every process `down` must stop. One lock file serialises
`up`, `down` and the pytest fixture across processes. A lease is a file per
pytest session using the bed, so a session never stops a bed another session
still uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

from tests.testbed.paths import BedPaths
from tests.testbed.processes import ProcessRecord

log = logging.getLogger("testbed")

OWNER_CLI = "cli"
OWNER_SESSION = "session"


@dataclass
class BedState:
    """What one `up` started; `complete` turns true once every part passed its health check."""

    owner: str
    started_at: float = field(default_factory=time.time)
    complete: bool = False
    # Hash of tests/testbed's code and fixtures when the bed started.
    fingerprint: str = ""
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    # Values clients need: the contract variables and the control plane's URLs.
    facts: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "started_at": self.started_at,
            "complete": self.complete,
            "fingerprint": self.fingerprint,
            "processes": [record.to_json() for record in self.processes.values()],
            "ports": self.ports,
            "facts": self.facts,
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BedState:
        records = [ProcessRecord.from_json(item) for item in data.get("processes", [])]
        return cls(
            owner=data.get("owner", OWNER_CLI),
            started_at=float(data.get("started_at", 0)),
            complete=bool(data.get("complete", False)),
            fingerprint=str(data.get("fingerprint", "")),
            processes={record.name: record for record in records},
            ports={key: int(value) for key, value in data.get("ports", {}).items()},
            facts=dict(data.get("facts", {})),
            timings={key: float(value) for key, value in data.get("timings", {}).items()},
        )

    def save(self, paths: BedPaths) -> None:
        with self._lock:
            paths.root.mkdir(parents=True, exist_ok=True)
            temporary = paths.state_file.with_suffix(".tmp")
            # The facts hold the database password, so only the owner may read the file.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as file:
                json.dump(self.to_json(), file, indent=2)
            temporary.replace(paths.state_file)

    def add_process(self, paths: BedPaths, record: ProcessRecord) -> None:
        with self._lock:
            self.processes[record.name] = record
        self.save(paths)


def load_state(paths: BedPaths) -> BedState | None:
    try:
        data = json.loads(paths.state_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable %s: %s", paths.state_file, error)
        return None
    return BedState.from_json(data)


@contextlib.contextmanager
def bed_lock(paths: BedPaths, *, report_every: float = 30.0) -> Iterator[None]:
    """Hold the bed's lock, waiting (and logging every 30 s) while another command holds it."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with paths.lock_file.open("a+") as lock_file:
        waited_since = time.monotonic()
        last_report = waited_since
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - last_report >= report_every:
                    lock_file.seek(0)
                    holder = lock_file.read().strip() or "unknown"
                    log.info(
                        "waiting for another test bed command (process %s) to finish (%.0f s)",
                        holder,
                        time.monotonic() - waited_since,
                    )
                    last_report = time.monotonic()
                time.sleep(0.5)
        try:
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.write(str(os.getpid()))
            lock_file.flush()
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _process_start(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None


def add_lease(paths: BedPaths) -> None:
    paths.leases.mkdir(parents=True, exist_ok=True)
    (paths.leases / str(os.getpid())).write_text(str(_process_start(os.getpid())))


def remove_lease(paths: BedPaths) -> None:
    (paths.leases / str(os.getpid())).unlink(missing_ok=True)


def live_leases(paths: BedPaths) -> list[int]:
    """Return the ids of other live processes holding a lease; drop leases of dead ones."""
    holders: list[int] = []
    if not paths.leases.is_dir():
        return holders
    for lease in paths.leases.iterdir():
        try:
            pid, recorded = int(lease.name), float(lease.read_text())
        except (ValueError, OSError):
            lease.unlink(missing_ok=True)
            continue
        started = _process_start(pid)
        if pid != os.getpid() and started is not None and abs(started - recorded) < 0.01:
            holders.append(pid)
        elif pid != os.getpid():
            lease.unlink(missing_ok=True)
    return holders
