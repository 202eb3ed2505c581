"""Ingest: parse and store Trivy reports of 3,200 and 32,000 findings; time and peak memory.

The small report is Trivy's real JSON report of fixtures/many-findings (160
copies of one Node.js app, 20 findings each), made with the local executor's
flags. The large one scales it by ten: its Results entries are repeated with
the copy number appended to each Target, so every finding stays a real
Trivy finding and the JSON keeps Trivy's exact shape.

Each measurement runs in a fresh subprocess (bench/ingest_worker.py) against
a PostgreSQL database of its own on the test bed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import stats
from bench.bed import scratch_database
from bench.context import RunContext, say
from bench.results import PartResult, Target, seconds
from bench.servers import migrate, secapi_env
from bench.trivy import bare_trivy_command

TITLE = "Ingest of large reports"
IMAGE = "fixtures/many-findings:1.0"
SCALE = 10
TARGET_MEMORY_FACTOR = 5.0
# Time per finding of the large report over that of the small one; 1.0 is exactly linear.
TARGET_LINEARITY = 1.25
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_reports(context: RunContext) -> dict[str, Path]:
    """Scan the fixture image with Trivy and write the real and the scaled report."""
    small = context.work_dir / "report-small.json"
    command = bare_trivy_command(context.bed, image=context.bed.image(IMAGE), output=small)
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"Trivy failed: {result.stderr.decode(errors='replace')[-500:]}")

    report = json.loads(small.read_bytes())
    results = report.get("Results") or []
    warmup = context.work_dir / "report-warmup.json"
    warmup.write_text(json.dumps({**report, "Results": results[:1]}, indent=2))

    scaled = []
    for copy in range(1, SCALE + 1):
        for entry in results:
            clone = dict(entry)
            clone["Target"] = f"{entry['Target']}#{copy}" if copy > 1 else entry["Target"]
            scaled.append(clone)
    report["Results"] = scaled
    large = context.work_dir / "report-large.json"
    # Trivy indents its JSON with two spaces; so does the scaled copy, for a like-for-like size.
    large.write_text(json.dumps(report, indent=2))
    return {"small": small, "large": large, "warmup": warmup}


def _worker(report: Path, warmup: Path, database_url: str, mode: str) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.ingest_worker",
            "--report",
            str(report),
            "--warmup",
            str(warmup),
            "--database-url",
            database_url,
            "--mode",
            mode,
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the ingest worker failed: {result.stderr[-1500:]}")
    line = next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{"))
    data: dict[str, Any] = json.loads(line)
    return data


def _summarize(timed: list[dict[str, Any]], traced: dict[str, Any]) -> dict[str, Any]:
    size = timed[0]["report_bytes"]
    rss = max(item["rss_delta_bytes"] for item in timed)
    return {
        "report_bytes": size,
        "findings": timed[0]["findings"],
        "runs": len(timed),
        "seconds": stats.summarize([item["seconds"] for item in timed]),
        "parse_seconds": stats.summarize([item["parse_seconds"] for item in timed]),
        "store_seconds": stats.summarize([item["store_seconds"] for item in timed]),
        "rss_delta_bytes_max": rss,
        "tracemalloc_peak_bytes": traced["tracemalloc_peak_bytes"],
        "rss_factor": round(rss / size, 3),
        "tracemalloc_factor": round(traced["tracemalloc_peak_bytes"] / size, 3),
    }


def run(context: RunContext) -> PartResult:
    repeats = context.scale(4, 1)
    reports = make_reports(context)
    figures: dict[str, Any] = {}
    with scratch_database(context.bed, "secapi_bench_ingest") as database_url:
        migrate(secapi_env({"DATABASE_URL": database_url}))
        # Sizes alternate, so a change in the machine's load hits both alike.
        timed: dict[str, list[dict[str, Any]]] = {"small": [], "large": []}
        for _ in range(repeats):
            for label in timed:
                timed[label].append(
                    _worker(reports[label], reports["warmup"], database_url, "time")
                )
        for label in timed:
            traced = _worker(reports[label], reports["warmup"], database_url, "tracemalloc")
            figures[label] = _summarize(timed[label], traced)
            item = figures[label]
            say(
                f"ingest: {label}: {item['findings']} findings in {item['seconds']['p50']:.2f} s, "
                f"RSS +{item['rss_delta_bytes_max'] / 2**20:.0f} MiB for {item['report_bytes'] / 2**20:.1f} MiB"
            )

    small, large = figures["small"], figures["large"]
    per_finding_small = small["seconds"]["p50"] / small["findings"]
    per_finding_large = large["seconds"]["p50"] / large["findings"]
    linearity = per_finding_large / per_finding_small
    figures["linearity"] = round(linearity, 3)
    rows = []
    targets = []
    for label in ("small", "large"):
        item = figures[label]
        rows += [
            (
                f"{label}: {item['findings']} findings, report size",
                f"{item['report_bytes'] / 2**20:.1f} MiB",
            ),
            (
                f"{label}: parse + store, median (parse / store)",
                f"{seconds(item['seconds']['p50'])} ({seconds(item['parse_seconds']['p50'])} / "
                f"{seconds(item['store_seconds']['p50'])})",
            ),
            (
                f"{label}: time per finding",
                f"{item['seconds']['p50'] / item['findings'] * 1e6:.0f} µs",
            ),
            (
                f"{label}: peak RSS increase (x report size)",
                f"{item['rss_delta_bytes_max'] / 2**20:.1f} MiB ({item['rss_factor']:.2f}x)",
            ),
            (
                f"{label}: tracemalloc peak (x report size)",
                f"{item['tracemalloc_peak_bytes'] / 2**20:.1f} MiB ({item['tracemalloc_factor']:.2f}x)",
            ),
        ]
        targets += [
            Target(
                f"{label}: peak RSS increase / report size",
                item["rss_factor"],
                "<",
                TARGET_MEMORY_FACTOR,
            ),
            Target(
                f"{label}: tracemalloc peak / report size",
                item["tracemalloc_factor"],
                "<",
                TARGET_MEMORY_FACTOR,
            ),
        ]
    rows.append(("time per finding, large / small (1.0 = linear)", f"{linearity:.3f}"))
    targets.append(Target("time per finding, large / small", linearity, "<=", TARGET_LINEARITY))
    method = [
        f"Reports: Trivy's JSON report of `{IMAGE}` ({small['findings']} findings) and the same "
        f"report with its Results repeated {SCALE} times ({large['findings']} findings).",
        "Each figure comes from a fresh subprocess: after one unmeasured warm-up report (the "
        "first Result only), `parse_report(bytes)` then `store_results` and commit on "
        "PostgreSQL, as the operator does with a verified report. Time and RSS "
        f"(psutil, every 2 ms, minus the RSS just before parsing): median time and largest RSS of "
        f"{repeats} runs per size, the sizes alternating; tracemalloc peak from one more run each.",
    ]
    return PartResult(
        part="ingest", title=TITLE, method=method, figures=figures, rows=rows, targets=targets
    )
