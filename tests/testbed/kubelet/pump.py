"""One thread that moves every container's output into its log and notices exits.

A thread per pipe would mean 400 threads for 200 pods. Instead one selector
waits on all stdout and stderr pipes and on a pidfd per process, which becomes
readable when the process exits, so an idle kubelet uses no CPU at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .logs import ContainerLog

logger = logging.getLogger(__name__)

# Seconds to wait for pipes to close after the process exited. A daemon that
# left its own session keeps them open; a runtime would have killed it with
# the container's cgroup, this kubelet only stops reading.
DRAIN_SECONDS = 2.0


@dataclass(eq=False)
class ProcessHandle:
    """A running container process, its log and what is known about its end."""

    process: subprocess.Popen[bytes]
    log: ContainerLog
    on_exit: Callable[[], None]
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    returncode: int | None = None
    exited: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reaped: bool = False
    _open_pipes: int = 2
    _drain_deadline: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal_group(self, signum: int) -> None:
        """Send a signal to the process group, unless the process is reaped already.

        The check under the lock matters: a reaped process id may belong to
        another process by now.
        """
        with self._lock:
            if self._reaped:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signum)

    def _reap(self) -> None:
        # The process is a zombie now, so its group id is still unambiguous:
        # kill what it left behind, as a runtime does when a container ends.
        with self._lock:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.returncode = self.process.wait()
            self.finished_at = time.time()
            self._reaped = True


class OutputPump(threading.Thread):
    """The thread that serves every `ProcessHandle` handed to `watch`."""

    def __init__(self) -> None:
        super().__init__(name="output-pump", daemon=True)
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._incoming: list[ProcessHandle] = []
        self._draining: set[ProcessHandle] = set()
        self._lock = threading.Lock()

    def watch(self, handle: ProcessHandle) -> None:
        """Start moving a process's output into its log."""
        with self._lock:
            self._incoming.append(handle)
        os.write(self._wake_write, b"x")

    def run(self) -> None:
        while True:
            timeout = None
            if self._draining:
                deadline = min(h._drain_deadline or 0.0 for h in self._draining)
                timeout = max(0.0, deadline - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    self._register_incoming()
                else:
                    handle, stream = key.data
                    try:
                        self._service(key, handle, stream)
                    except Exception:
                        logger.exception(
                            "The output pump failed on %s of process %d.", stream, handle.pid
                        )
            self._expire_drains()

    def _register_incoming(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_read, 4096)
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for handle in incoming:
            process = handle.process
            assert process.stdout is not None and process.stderr is not None
            self._selector.register(process.stdout, selectors.EVENT_READ, (handle, "stdout"))
            self._selector.register(process.stderr, selectors.EVENT_READ, (handle, "stderr"))
            pidfd = os.pidfd_open(process.pid)
            self._selector.register(pidfd, selectors.EVENT_READ, (handle, "exit"))

    def _service(self, key: selectors.SelectorKey, handle: ProcessHandle, stream: str) -> None:
        if stream == "exit":
            self._selector.unregister(key.fd)
            os.close(key.fd)
            handle._reap()
            handle._drain_deadline = time.monotonic() + DRAIN_SECONDS
            self._draining.add(handle)
            self._finish_if_done(handle)
            return

        data = os.read(key.fd, 64 * 1024)
        if data:
            handle.log.feed(stream, data)
            return
        self._close_pipe(handle, stream)

    def _close_pipe(self, handle: ProcessHandle, stream: str) -> None:
        pipe = handle.process.stdout if stream == "stdout" else handle.process.stderr
        assert pipe is not None
        self._selector.unregister(pipe)
        pipe.close()
        handle.log.end_stream(stream)
        handle._open_pipes -= 1
        self._finish_if_done(handle)

    def _expire_drains(self) -> None:
        now = time.monotonic()
        for handle in [h for h in self._draining if (h._drain_deadline or 0.0) <= now]:
            process = handle.process
            for stream, pipe in (("stdout", process.stdout), ("stderr", process.stderr)):
                if pipe is not None and not pipe.closed:
                    logger.warning(
                        "Process %d exited but something still holds its %s open; "
                        "the kubelet stops reading it.",
                        handle.pid,
                        stream,
                    )
                    self._close_pipe(handle, stream)

    def _finish_if_done(self, handle: ProcessHandle) -> None:
        if not handle._reaped or handle._open_pipes > 0:
            return
        self._draining.discard(handle)
        handle.log.close()
        handle.exited.set()
        handle.on_exit()
