"""Run one Trivy process: argument list in, exit status and the end of stderr out.

The process runs in a session (process group) of its own, so a kill on
timeout or cancel reaches anything it started. Where util-linux's setpriv
is installed (Linux) it is also killed when the SecAPI process dies, so a
crashed server leaves no scan running without an owner. It gets a filtered
environment: Trivy's own variables (TRIVY_*), registry credentials of cloud providers, proxy and TLS settings, but never
SecAPI's own secrets such as SECRET_KEY or DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
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


def trivy_environment(environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a Trivy process, taken from ``environment`` (default: ours)."""
    environment = os.environ if environment is None else environment
    return {
        name: value
        for name, value in environment.items()
        if name in _PASSED_VARIABLES or name.startswith(_PASSED_PREFIXES)
    }


@functools.cache
def _death_signal_prefix() -> tuple[str, ...]:
    """Return the command prefix that makes Trivy die with this process, or () without one.

    ``setpriv --pdeathsig KILL --`` (util-linux) sets the parent-death signal and
    then runs Trivy in its place, keeping the process id. A pre-exec function
    could do the same, but it makes Python fork() the whole server instead of
    using vfork, which cost 16-28 ms per scan in a measurement.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        # An old setpriv without --pdeathsig would make every scan fail: check it once.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run(
                [setpriv, "--pdeathsig", "KILL", "--", "true"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=10,
                check=False,
            )
            if probe.returncode == 0:
                return (setpriv, "--pdeathsig", "KILL", "--")
    log.warning(
        "setpriv with --pdeathsig not found, so trivy processes outlive a killed secapi process",
        setpriv=setpriv,
        hint="install a util-linux whose setpriv has --pdeathsig to have them killed with it",
    )
    return ()


@dataclass(frozen=True)
class ProcessResult:
    returncode: int | None
    stderr: str
    timed_out: bool
    killed: bool


class TrivyProcess:
    """One running Trivy process, which ``kill`` may end from another task.

    The process is started with subprocess.Popen, which uses vfork on Linux, and
    its exit is watched through a pidfd in the running event loop. uvloop's own
    subprocess support forks the whole server instead, which blocked the event
    loop for about 5 ms per scan against 0.3 ms for Popen (a 74 MB process,
    medians of 35 starts on a 2-core machine). Without pidfd_open (Linux 5.3
    and later), a thread waits for the exit.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self.killed = False

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def finished(self) -> bool:
        """Tell whether the process has exited and been waited for."""
        return self._process.returncode is not None

    def kill(self) -> None:
        """Kill the whole process group at once; Trivy does not always stop on SIGTERM."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)

    async def _read_stderr(self) -> bytes:
        stream = self._process.stderr
        assert stream is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_CHUNK_BYTES)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), stream
        )
        tail = bytearray()
        try:
            while chunk := await reader.read(READ_CHUNK_BYTES):
                tail += chunk
                if len(tail) > STDERR_TAIL_BYTES:
                    del tail[: len(tail) - STDERR_TAIL_BYTES]
        finally:
            transport.close()
        return bytes(tail)

    async def _exited(self) -> int:
        """Wait until the process exits, reap it and return its exit status."""
        if self._process.returncode is not None:
            return self._process.returncode
        try:
            pidfd = os.pidfd_open(self._process.pid)
        except (AttributeError, OSError):
            return await asyncio.to_thread(self._process.wait)
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(pidfd, on_readable)
        try:
            # A pidfd becomes readable when its process exits.
            await readable
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self._process.wait()

    async def wait(self, *, timeout_seconds: float) -> ProcessResult:
        """Wait for the process, killing it after ``timeout_seconds``."""
        reader = asyncio.create_task(self._read_stderr())
        timed_out = False
        try:
            await asyncio.wait_for(self._exited(), timeout=timeout_seconds)
        except TimeoutError:
            timed_out = True
            self.kill()
            await self._exited()
        except asyncio.CancelledError:
            self.kill()
            await asyncio.shield(self._exited())
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
    prefix = _death_signal_prefix()
    # setpriv starts even when Trivy is missing, so check here that callers get OSError for it.
    if prefix and shutil.which(command[0], path=environment.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(
            errno.ENOENT, "no executable file at this path or on PATH", command[0]
        )
    # Popen blocks the event loop only while vfork and exec run (see TrivyProcess).
    process = subprocess.Popen(  # noqa: ASYNC220
        [*prefix, *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(environment),
        cwd=cwd,
        start_new_session=True,
    )
    log.debug("trivy started", pid=process.pid)
    return TrivyProcess(process)
