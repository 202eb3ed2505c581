"""One ingest measurement in a fresh process: parse a Trivy report and store it for a new scan.

Run by bench/ingest.py as `python -m bench.ingest_worker --report FILE
--database-url URL --mode time|tracemalloc`; prints one JSON line. The scan
row and its user are created first. The clock and the memory counters then
cover exactly what the operator does with a verified report:
`parse_report(bytes)` and `store_results` in one transaction, committed.

Memory is measured two ways, and tracemalloc never runs in a process whose
time is reported:
- mode "time": resident memory sampled every 2 ms with psutil; the figure is
  the peak minus the resident memory just before parsing (the report's bytes
  are already loaded then, so they are not counted);
- mode "tracemalloc": the peak of Python allocations traced from just before
  parsing to the commit (slower, so its time is not reported).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import threading
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import psutil
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from secapi.core.db.engine import create_engine, create_session_factory
from secapi.core.db.models import Scan, User
from secapi.core.scans import repository
from secapi.core.scans.report import parse_report
from secapi.core.scans.store import store_results
from secapi.core.settings import Settings


class _PeakRss:
    def __init__(self, interval: float = 0.002) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._done = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._done.wait(self._interval)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


async def _create_scans(factory: async_sessionmaker[AsyncSession], count: int) -> list[str]:
    async with factory() as session:
        user = User(email=f"ingest-{uuid.uuid4().hex[:8]}@example.com")
        session.add(user)
        await session.flush()
        scans = [
            await repository.add_scan(
                session,
                user_id=user.id,
                image="bench/ingest:1",
                options={},
                priority=0,
                executor="kubernetes",
            )
            for _ in range(count)
        ]
        await session.commit()
        return [scan.id for scan in scans]


async def _store(factory: async_sessionmaker[AsyncSession], scan_id: str, report: Any) -> bool:
    async with factory() as session:
        scan = await session.get(Scan, scan_id)
        assert scan is not None
        stored = await store_results(session, scan=scan, report=report)
        await session.commit()
    return stored


async def _ingest(settings: Settings, data: bytes, warmup: bytes, mode: str) -> dict[str, Any]:
    engine = create_engine(settings)
    factory = create_session_factory(engine)
    warmup_id, scan_id = await _create_scans(factory, 2)
    # A long-running operator has its connection open and its code paths warm:
    # one small report is parsed and stored first, outside the measurement.
    await _store(factory, warmup_id, parse_report(warmup))
    gc.collect()

    rss_before = psutil.Process().memory_info().rss
    sampler = _PeakRss()
    if mode == "tracemalloc":
        tracemalloc.start()
    with sampler:
        started = time.perf_counter()
        report = parse_report(data)
        parsed = time.perf_counter()
        stored = await _store(factory, scan_id, report)
        finished = time.perf_counter()
        findings = report.summary.total
        del report
    traced_peak = tracemalloc.get_traced_memory()[1] if mode == "tracemalloc" else None
    if mode == "tracemalloc":
        tracemalloc.stop()
    await engine.dispose()
    if not stored:
        raise RuntimeError(f"scan {scan_id} was not stored")
    return {
        "mode": mode,
        "report_bytes": len(data),
        "findings": findings,
        "seconds": finished - started,
        "parse_seconds": parsed - started,
        "store_seconds": finished - parsed,
        "rss_delta_bytes": sampler.peak - rss_before,
        "tracemalloc_peak_bytes": traced_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_worker")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument(
        "--warmup", type=Path, required=True, help="small report stored first, not measured"
    )
    parser.add_argument("--mode", choices=("time", "tracemalloc"), default="time")
    args = parser.parse_args()
    # The store logs one line per scan; stdout carries only the result.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    settings = Settings(database_url=args.database_url)
    data = args.report.read_bytes()
    result = asyncio.run(_ingest(settings, data, args.warmup.read_bytes(), args.mode))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
