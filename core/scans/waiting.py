"""In-process notices that a scan ended, for requests that wait on a scan.

The local executor calls ``scan_ended`` after it records a scan as
completed or failed, and a waiting request wakes at once. Scans that end
elsewhere (the kubernetes executor's operator, another server process) send
no notice here, so waiters also re-read the scan's status every second or so.
When the server begins to stop, ``end_all_waits`` wakes every waiter, so long
polls return the scan's current state instead of holding up the shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

# Event per waiting request, by scan id. Each event belongs to the event loop that awaits it.
_WAITERS: dict[str, set[asyncio.Event]] = {}
# Set by end_all_waits: waits that begin while the server stops end at once.
_stopping = False


def scan_ended(scan_id: str) -> None:
    """Wake every request in this process that waits for ``scan_id``."""
    for event in _WAITERS.get(scan_id, ()):
        event.set()


def end_all_waits() -> None:
    """Wake every waiting request in this process, and end later waits at once."""
    global _stopping
    _stopping = True
    for waiters in _WAITERS.values():
        for event in waiters:
            event.set()


def allow_waits() -> None:
    """Let waits last again; the lifespan calls it when a server starts in this process."""
    global _stopping
    _stopping = False


def waits_ended() -> bool:
    """Tell whether ``end_all_waits`` was called since the server started."""
    return _stopping


@contextmanager
def watch_scan(scan_id: str) -> Iterator[asyncio.Event]:
    """Return an event that ``scan_ended(scan_id)`` or ``end_all_waits`` sets, during the block."""
    event = asyncio.Event()
    _WAITERS.setdefault(scan_id, set()).add(event)
    try:
        yield event
    finally:
        waiters = _WAITERS.get(scan_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                _WAITERS.pop(scan_id, None)
