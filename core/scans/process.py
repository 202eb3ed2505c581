"""Run one Trivy process: argument list in, exit status and the end of stderr out.

The process runs in a session (process group) of its own, so a kill on
timeout or cancel reaches anything it started. On Linux it is also killed when
the SecAPI process dies, so a crashed server leaves no scan running without
an owner. It gets a filtered environment: Trivy's own variables (TRIVY_*),
registry credentials of cloud providers, proxy and TLS settings, but never
SecAPI's own secrets such as SECRET_KEY or DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

# The end of stderr that is kept; Trivy prints its fatal error last.
STDERR_TAIL_BYTES = 64 * 1024
READ_CHUNK_BYTES = 8192

_PASSED_VARIABLES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "LC_ALL",
        "TZ",
        "TMPDIR",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "DOCKER_CONFIG",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
    }
)
# Prefixes of Trivy's settings and of the cloud credentials Trivy uses for
# ECR, GCR/Artifact Registry and ACR.
_PASSED_PREFIXES = ("TRIVY_", "AWS_", "GOOGLE_", "AZURE_")

_PR_SET_PDEATHSIG = 1


def trivy_environment(environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a Trivy process, taken from ``environment`` (default: ours)."""
    environment = os.environ if environment is None else environment
    return {
        name: value
        for name, value in environment.items()
        if name in _PASSED_VARIABLES or name.startswith(_PASSED_PREFIXES)
    }


def _death_signal_setter() -> Callable[[], None] | None:
    """Return a pre-exec function that makes the child die with its parent (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Loaded here, before any fork, so the child only makes the call.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return set_death_signal


_SET_DEATH_SIGNAL = _death_signal_setter()


@dataclass(frozen=True)
class ProcessResult:
    returncode: int | None
    stderr: str
    timed_out: bool
    killed: bool


class TrivyProcess:
    """One running Trivy process, which ``kill`` may end from another task."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.killed = False

    @property
    def pid(self) -> int:
        return self._process.pid

    def kill(self) -> None:
        """Kill the whole process group at once; Trivy does not always stop on SIGTERM."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)

    async def _read_stderr(self) -> bytes:
        tail = bytearray()
        stream = self._process.stderr
        assert stream is not None
        while chunk := await stream.read(READ_CHUNK_BYTES):
            tail += chunk
            if len(tail) > STDERR_TAIL_BYTES:
                del tail[: len(tail) - STDERR_TAIL_BYTES]
        return bytes(tail)

    async def wait(self, *, timeout_seconds: float) -> ProcessResult:
        """Wait for the process, killing it after ``timeout_seconds``."""
        reader = asyncio.create_task(self._read_stderr())
        timed_out = False
        try:
            await asyncio.wait_for(self._process.wait(), timeout=timeout_seconds)
        except TimeoutError:
            timed_out = True
            self.kill()
            await self._process.wait()
        except asyncio.CancelledError:
            self.kill()
            await asyncio.shield(self._process.wait())
            raise
        finally:
            # Another member of the group may hold the stderr pipe open after the leader exits.
            if not reader.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), timeout=5)
            if not reader.done():
                self.kill()
        try:
            stderr = await asyncio.wait_for(reader, timeout=5)
        except TimeoutError:
            stderr = b""
        return ProcessResult(
            returncode=self._process.returncode,
            stderr=stderr.decode("utf-8", errors="replace"),
            timed_out=timed_out,
            killed=self.killed,
        )


async def start_trivy(
    command: Sequence[str], *, environment: Mapping[str, str], cwd: str | None = None
) -> TrivyProcess:
    """Start ``command`` (an argument list, never a shell string); raise OSError if it cannot start."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=dict(environment),
        cwd=cwd,
        start_new_session=True,
        # Only calls prctl, which was looked up before the fork.
        preexec_fn=_SET_DEATH_SIGNAL,
    )
    log.debug("trivy started", pid=process.pid)
    return TrivyProcess(process)
