"""In-process notices that a scan ended, for requests that wait on a scan.

The local executor calls ``scan_ended`` after it records a scan as
completed or failed, and a waiting request wakes at once. Scans that end
elsewhere (the kubernetes executor's operator, another server process) send
no notice here, so waiters also re-read the scan's status every second or so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

# Event per waiting request, by scan id. Each event belongs to the event loop that awaits it.
_WAITERS: dict[str, set[asyncio.Event]] = {}


def scan_ended(scan_id: str) -> None:
    """Wake every request in this process that waits for ``scan_id``."""
    for event in _WAITERS.get(scan_id, ()):
        event.set()


@contextmanager
def watch_scan(scan_id: str) -> Iterator[asyncio.Event]:
    """Return an event that ``scan_ended(scan_id)`` sets, for the duration of the block."""
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
