"""The pure parts of the benchmark harness: percentiles, targets, result files, replays.

The benchmarks themselves run with `make bench`, not here; these tests check
the arithmetic and bookkeeping that turn their samples into recorded figures.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from bench import report
from bench.cluster import Event
from bench.loadgen import run_wrk
from bench.queue_throughput import _concurrency
from bench.results import PartResult, Target
from bench.stats import percentile, summarize


def test_percentile_matches_inclusive_quantiles() -> None:
    samples = [0.31, 0.12, 0.5, 0.27, 0.9, 0.05, 0.44, 0.61, 0.18, 0.73, 0.2]
    expected = statistics.quantiles(samples, n=100, method="inclusive")
    for q in (10, 50, 90, 99):
        assert percentile(samples, q) == pytest.approx(expected[q - 1])


def test_percentile_ends_are_min_and_max() -> None:
    samples = [3.0, 1.0, 2.0]
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 3.0


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_summarize_counts_and_rounds() -> None:
    summary = summarize([1.0, 2.0, 3.0, 4.0], digits=2)
    assert summary["count"] == 4
    assert summary["p50"] == 2.5
    assert summary["min"] == 1.0
    assert summary["max"] == 4.0
    assert summarize([]) == {"count": 0}


@pytest.mark.parametrize(
    ("value", "comparison", "limit", "met"),
    [
        (1.10, "<=", 1.10, True),
        (1.11, "<=", 1.10, False),
        (0.2, "<", 0.2, False),
        (0.19, "<", 0.2, True),
        (0.5, ">=", 0.5, True),
        (0.49, ">=", 0.5, False),
    ],
)
def test_target_met(value: float, comparison: str, limit: float, met: bool) -> None:
    target = Target("figure", value, comparison, limit)  # type: ignore[arg-type]
    assert target.met is met
    assert target.to_json()["met"] is met


def _part(name: str, value: float) -> PartResult:
    return PartResult(
        part=name,
        title=f"Title of {name}",
        method=["One sentence of method."],
        figures={"value": value},
        rows=[("a figure | with a bar", "1.0 ms")],
        targets=[Target("value", value, "<=", 1.0)],
    )


def _run(started_at: str) -> dict[str, object]:
    return {
        "started_at": started_at,
        "duration_seconds": 12.0,
        "command": "python -m bench",
        "parts": [],
        "quick": False,
        "load_average_at_end": [0.5, 0.5, 0.5],
    }


def test_write_json_keeps_other_parts_when_merging(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    first = _run("2026-01-01T00:00:00+00:00")
    second = _run("2026-01-02T00:00:00+00:00")
    report.write_json(
        path,
        run=first,
        machine={},
        versions={},
        parts=[_part("a", 0.5), _part("b", 0.7)],
        merge=True,
    )
    report.write_json(
        path, run=second, machine={}, versions={}, parts=[_part("b", 2.0)], merge=True
    )

    parts = json.loads(path.read_text())["parts"]
    assert parts["a"]["figures"] == {"value": 0.5}
    assert parts["a"]["run_started_at"] == first["started_at"]
    assert parts["b"]["figures"] == {"value": 2.0}
    assert parts["b"]["targets"][0]["met"] is False


def test_write_json_without_merge_replaces_everything(tmp_path: Path) -> None:
    path = tmp_path / "quick.json"
    report.write_json(
        path,
        run=_run("2026-01-01T00:00:00+00:00"),
        machine={},
        versions={},
        parts=[_part("a", 0.5)],
        merge=False,
    )
    report.write_json(
        path,
        run=_run("2026-01-02T00:00:00+00:00"),
        machine={},
        versions={},
        parts=[_part("b", 0.5)],
        merge=False,
    )
    assert set(json.loads(path.read_text())["parts"]) == {"b"}


def _section(title: str) -> str:
    machine = {
        "cpu_model": "CPU",
        "logical_cores": 2,
        "memory_gib": 4.0,
        "os": "OS",
        "kernel": "6.0",
        "load_average_at_start": [0.1, 0.1, 0.1],
    }
    versions = {
        "python": "3.11",
        "trivy": "0.74.0",
        "kubernetes": "v1.37.2",
        "postgresql": "15",
        "git": {"commit": "0123456789abcdef", "uncommitted_changes": False},
        "python_packages": {"fastapi": "1", "uvicorn": "1", "sqlalchemy": "2", "kopf": "1"},
    }
    return report.render_section(
        run=_run(title), machine=machine, versions=versions, parts=[_part("a", 0.5)]
    )


def test_insert_section_puts_newest_first(tmp_path: Path) -> None:
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\nHand-written head.\n")
    report.insert_section(page, _section("2026-01-01T00:00:00+00:00"))
    report.insert_section(page, _section("2026-01-02T00:00:00+00:00"))

    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written head.\n")
    assert text.count(report.MARKER) == 1
    assert text.index("## 2026-01-02 00:00 UTC") < text.index("## 2026-01-01 00:00 UTC")
    assert text.index(report.MARKER) < text.index("## 2026-01-02 00:00 UTC")


def test_render_section_escapes_table_bars() -> None:
    section = _section("2026-01-01T00:00:00+00:00")
    assert "| a figure \\| with a bar | 1.0 ms |" in section
    assert "| value <= 1 | 0.5 | yes |" in section


def _event(name: str, kind: str, obj: dict[str, object]) -> Event:
    return Event(received_at=0.0, type=kind, name=name, obj=obj)


def _job(*conditions: str) -> dict[str, object]:
    return {"status": {"conditions": [{"type": kind, "status": "True"} for kind in conditions]}}


def _pod(phase: str) -> dict[str, object]:
    return {"status": {"phase": phase}}


def test_concurrency_replay_counts_jobs_and_pods() -> None:
    jobs = [
        _event("one", "ADDED", _job()),
        _event("two", "ADDED", _job()),
        _event("one", "MODIFIED", _job("Complete")),
        _event("three", "ADDED", _job()),
        # A late event of a finished Job must not count it again.
        _event("one", "MODIFIED", _job()),
        _event("two", "MODIFIED", _job("Failed")),
        _event("one", "DELETED", _job("Complete")),
    ]
    pods = [
        _event("p1", "ADDED", _pod("Pending")),
        _event("p1", "MODIFIED", _pod("Running")),
        _event("p2", "MODIFIED", _pod("Running")),
        _event("p1", "MODIFIED", _pod("Succeeded")),
        _event("p3", "MODIFIED", _pod("Running")),
    ]
    counts = _concurrency(jobs, pods)
    assert counts["max_jobs_unfinished"] == 2
    assert counts["max_jobs_existing"] == 3
    assert counts["max_pods_running"] == 2


def test_load_generator_targets_loopback_only() -> None:
    with pytest.raises(ValueError, match=r"only target 127\.0\.0\.1"):
        run_wrk("http://example.invalid:8000/health", method="GET")
