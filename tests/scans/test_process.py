"""Starting and waiting for scan processes, on asyncio's loop and on uvloop, with and without pidfd."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from secapi.core.scans.process import ProcessResult, start_trivy

SHELL = "/bin/sh"
ENVIRONMENT = {"PATH": os.defpath}


async def run_shell(script: str, *, timeout_seconds: float = 30) -> tuple[ProcessResult, int]:
    process = await start_trivy([SHELL, "-c", script], environment=ENVIRONMENT)
    return await process.wait(timeout_seconds=timeout_seconds), process.pid


def run_on(loop_name: str, coroutine: Coroutine[Any, Any, Any]) -> Any:
    runners: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {
        "asyncio": asyncio.run,
        "uvloop": uvloop.run,
    }
    return runners[loop_name](coroutine)


@pytest.fixture(params=["pidfd", "thread"])
def exit_watch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "thread":
        # Like a system without pidfd_open: a thread waits for the exit instead.
        monkeypatch.delattr(os, "pidfd_open")
    return str(request.param)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_exit_status_and_stderr_tail(loop_name: str, exit_watch: str) -> None:
    result, _ = run_on(loop_name, run_shell("echo first >&2; echo last >&2; exit 3"))

    assert result.returncode == 3
    assert result.stderr == "first\nlast\n"
    assert result.timed_out is False
    assert result.killed is False


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_long_stderr_keeps_its_end(loop_name: str, exit_watch: str) -> None:
    # About 200 KB on stderr, more than the 64 KiB tail that is kept.
    script = 'i=0; while [ $i -lt 20000 ]; do echo "line $i"; i=$((i+1)); done >&2; echo end >&2'
    result, _ = run_on(loop_name, run_shell(script))

    assert result.returncode == 0
    assert result.stderr.endswith("line 19999\nend\n")
    assert len(result.stderr.encode()) <= 64 * 1024


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_timeout_kills_the_process_group(loop_name: str, exit_watch: str) -> None:
    # The child sleeps in a process of its own, which only a kill of the group reaches.
    started = time.monotonic()
    result, pid = run_on(loop_name, run_shell("sleep 30 & wait", timeout_seconds=0.5))

    assert result.timed_out is True
    assert result.killed is True
    assert time.monotonic() - started < 15
    assert live_group_members(pid) == []


def live_group_members(group: int) -> list[int]:
    """Return the processes of a process group that are not zombies awaiting their reaper."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry))
    return members


async def test_cancelled_wait_kills_the_process(exit_watch: str) -> None:
    process = await start_trivy([SHELL, "-c", "sleep 30"], environment=ENVIRONMENT)
    waiting = asyncio.create_task(process.wait(timeout_seconds=60))
    await asyncio.sleep(0.2)

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    assert process.killed is True
    assert process.finished is True


async def test_missing_executable_raises_oserror() -> None:
    with pytest.raises(OSError, match="no-such-trivy"):
        await start_trivy(["/nonexistent/no-such-trivy", "--version"], environment=ENVIRONMENT)
