"""Overhead: one image scanned through the embedded API and by bare Trivy, side by side.

The embedded API is a real `secapi serve` subprocess: SQLite, the local
executor, Trivy with the fixture DB. Bare Trivy is `$TRIVY_BIN image` with
the same DB and the same flags the local executor passes (built by the same
code), writing its JSON report to a file, as a user would run it. SecAPI also
sets Go's GOGC and GOMEMLIMIT for its Trivy processes, so a third side runs
bare Trivy with those too: SecAPI against it is the cost of SecAPI alone. A
fourth side, a bare FastAPI app that runs the same command with the same
variables per request (bench/bare_app.py), shows how close any such service
can come. The sides run in rounds, the order rotating, after one warm-up round
that is not counted.
The API sides are timed as their client sees them, from sending the
submission to receiving the long poll (`wait`) that shows `completed`. Besides
two fixture images of a few kilobytes, it scans an image of typical size built
from this machine's files (bench/system_image.py).
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import client, stats, system_image
from bench.bare_app import IMAGE_PLACEHOLDER, OUTPUT_PLACEHOLDER, TRIVY_PREFIX
from bench.context import RunContext, say
from bench.results import PartResult, Target, seconds
from bench.servers import secapi_env, start_bare_app, start_secapi
from bench.trivy import bare_trivy_command, go_environment, scanner_env

TITLE = "Overhead against bare Trivy"
# Seconds each GET requests the server to wait for the scan to end. The server responds when the scan ends.
LONG_POLL_SECONDS = 30
TARGET_RATIO = 1.10
# (label, fixture image): a small report and the 3,200-finding one.
FIXTURE_IMAGES = (
    ("alpine", "fixtures/alpine:3.17"),
    ("many-findings", "fixtures/many-findings:1.0"),
)
# Label of the image of typical size (bench/system_image.py).
SYSTEM_LABEL = "system"


def _time_bare(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, check=False, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"bare Trivy failed with exit code {result.returncode}: "
            f"{result.stderr.decode(errors='replace')[-500:]}"
        )
    return elapsed


def _time_api(http: Any, image: str) -> tuple[float, float, int]:
    """Return (client-side seconds, server-side seconds, polls) of one scan through the API."""
    started = time.perf_counter()
    scan_id = client.submit(http, image)
    finished = client.wait_until_final(http, scan_id, interval=0.0, long_poll=LONG_POLL_SECONDS)
    elapsed = finished.received_at - started
    detail = finished.detail
    if detail["status"] != "completed":
        raise RuntimeError(
            f"scan of {image} ended {detail['status']}: {detail.get('reason')} {detail.get('message')}"
        )
    server_side = _server_seconds(detail)
    return elapsed, server_side, finished.polls


def _server_seconds(detail: dict[str, Any]) -> float:
    created = datetime.fromisoformat(detail["created_at"])
    completed = datetime.fromisoformat(detail["completed_at"])
    return (completed - created).total_seconds()


def _measure_image(
    context: RunContext, http: Any, bare_http: Any, *, label: str, image: str, rounds: int
) -> dict[str, Any]:
    output = context.work_dir / f"bare-{label}.json"
    command = bare_trivy_command(context.bed, image=image, output=output)
    tuned_env = {**os.environ, **go_environment(context.bed)}
    api_times: list[float] = []
    server_times: list[float] = []
    bare_times: list[float] = []
    tuned_times: list[float] = []
    bare_api_times: list[float] = []
    polls: list[int] = []

    def run_api() -> None:
        api, server, count = _time_api(http, image)
        api_times.append(api)
        server_times.append(server)
        polls.append(count)

    def run_bare() -> None:
        bare_times.append(_time_bare(command))

    def run_tuned() -> None:
        tuned_times.append(_time_bare(command, tuned_env))

    def run_bare_api() -> None:
        bare_api_times.append(_time_api(bare_http, image)[0])

    # One warm-up round: the first scan pays for cold caches on every side.
    _time_api(http, image)
    _time_bare(command)
    _time_bare(command, tuned_env)
    _time_api(bare_http, image)
    sides = [run_api, run_bare, run_tuned, run_bare_api]
    for index in range(rounds):
        # Each side takes each place in the order equally often over every four rounds.
        shift = index % len(sides)
        for side in sides[shift:] + sides[:shift]:
            side()

    ratios = [api / bare for api, bare in zip(api_times, bare_times, strict=True)]
    server_ratios = [server / bare for server, bare in zip(server_times, bare_times, strict=True)]
    to_tuned = [api / tuned for api, tuned in zip(api_times, tuned_times, strict=True)]
    tuned_ratios = [tuned / bare for tuned, bare in zip(tuned_times, bare_times, strict=True)]
    bare_api_ratios = [
        bare_api / tuned for bare_api, tuned in zip(bare_api_times, tuned_times, strict=True)
    ]
    to_bare_api = [api / bare_api for api, bare_api in zip(api_times, bare_api_times, strict=True)]
    say(f"overhead: {label}: median ratio {stats.median(ratios):.3f} over {rounds} rounds")
    return {
        "image": image,
        "rounds": rounds,
        "report_bytes": output.stat().st_size,
        "ratio": stats.summarize(ratios),
        "server_side_ratio": stats.summarize(server_ratios),
        "api_seconds": stats.summarize(api_times),
        "server_side_seconds": stats.summarize(server_times),
        "bare_trivy_seconds": stats.summarize(bare_times),
        "tuned_trivy_seconds": stats.summarize(tuned_times),
        "tuned_trivy_ratio": stats.summarize(tuned_ratios),
        "ratio_to_tuned_trivy": stats.summarize(to_tuned),
        "bare_api_seconds": stats.summarize(bare_api_times),
        "bare_api_ratio": stats.summarize(bare_api_ratios),
        "ratio_to_bare_api": stats.summarize(to_bare_api),
        "added_seconds_median": round(stats.median(api_times) - stats.median(bare_times), 4),
        "added_to_tuned_seconds_median": round(
            stats.median(api_times) - stats.median(tuned_times), 4
        ),
        "polls_per_scan": stats.summarize([float(count) for count in polls], digits=1),
        "command": " ".join(command),
        "go_environment": go_environment(context.bed),
    }


def run(context: RunContext) -> PartResult:
    bed = context.bed
    rounds = context.scale(15, 3)
    data_dir = context.work_dir / "overhead-data"
    env = secapi_env(
        {"SECAPI_DATA_DIR": str(data_dir), "SECAPI_EXECUTOR": "local", **scanner_env(bed)}
    )
    system = system_image.build_system_image(bed, context.work_dir)
    say(
        f"overhead: pushed {system.reference}: {system.content_bytes / 1e6:.0f} MB in "
        f"{system.files} files, {system.packages} Debian packages"
    )
    images = [(label, bed.image(name)) for label, name in FIXTURE_IMAGES]
    images.append((SYSTEM_LABEL, system.reference))
    placeholder_command = bare_trivy_command(
        bed, image=IMAGE_PLACEHOLDER, output=Path(OUTPUT_PLACEHOLDER)
    )
    document = context.work_dir / "overhead-bare-document.json"
    document.write_text("{}")
    with ExitStack() as stack:
        server = start_secapi("overhead-api", env=env, work_dir=context.work_dir)
        stack.callback(server.stop)
        bare = start_bare_app(
            "overhead-bare",
            document=document,
            work_dir=context.work_dir,
            trivy_command=placeholder_command,
            extra_env=go_environment(bed),
        )
        stack.callback(bare.stop)
        api_key = client.register(server.url, label="overhead")
        http = stack.enter_context(client.api_client(server.url, api_key))
        bare_http = stack.enter_context(client.api_client(bare.url + TRIVY_PREFIX, ""))
        figures: dict[str, Any] = {
            label: _measure_image(context, http, bare_http, label=label, image=image, rounds=rounds)
            for label, image in images
        }

    figures[SYSTEM_LABEL].update(
        content_bytes=system.content_bytes, files=system.files, packages=system.packages
    )
    figures["long_poll_seconds"] = LONG_POLL_SECONDS
    rows: list[tuple[str, str]] = [
        ("long poll wait", seconds(LONG_POLL_SECONDS)),
        (
            f"{SYSTEM_LABEL}: image content",
            f"{system.content_bytes / 1e6:.0f} MB, {system.files} files, "
            f"{system.packages} Debian packages",
        ),
    ]
    targets = []
    for label, _ in images:
        item = figures[label]
        rows += [
            (f"{label}: bare Trivy, median", seconds(item["bare_trivy_seconds"]["p50"])),
            (f"{label}: through the API, median", seconds(item["api_seconds"]["p50"])),
            (
                f"{label}: ratio API / bare, median (p90)",
                f"{item['ratio']['p50']:.3f} ({item['ratio']['p90']:.3f})",
            ),
            (
                f"{label}: server-side ratio (created_at to completed_at), median",
                f"{item['server_side_ratio']['p50']:.3f}",
            ),
            (f"{label}: time added, median", seconds(item["added_seconds_median"])),
            (
                f"{label}: bare Trivy with SecAPI's GOGC and GOMEMLIMIT, median "
                "(ratio to bare Trivy)",
                f"{seconds(item['tuned_trivy_seconds']['p50'])} "
                f"({item['tuned_trivy_ratio']['p50']:.3f})",
            ),
            (
                f"{label}: ratio API / bare Trivy with the same GOGC and GOMEMLIMIT, median",
                f"{item['ratio_to_tuned_trivy']['p50']:.3f}",
            ),
            (
                f"{label}: time added to bare Trivy with the same GOGC and GOMEMLIMIT, median",
                seconds(item["added_to_tuned_seconds_median"]),
            ),
            (
                f"{label}: bare FastAPI running Trivy, median (ratio to bare Trivy with the "
                "same GOGC and GOMEMLIMIT)",
                f"{seconds(item['bare_api_seconds']['p50'])} ({item['bare_api_ratio']['p50']:.3f})",
            ),
            (
                f"{label}: ratio SecAPI / bare FastAPI running Trivy, median",
                f"{item['ratio_to_bare_api']['p50']:.3f}",
            ),
        ]
        targets.append(Target(f"{label}: median ratio", item["ratio"]["p50"], "<=", TARGET_RATIO))
    method = [
        f"`secapi serve` subprocess on 127.0.0.1 (SQLite, local executor, one Trivy at a time, "
        f"fixture DB) against `$TRIVY_BIN image` with the executor's flags; {rounds} rounds "
        "per image after one warm-up round, each round one scan per side, the order rotating.",
        f"API time: from sending `POST /api/v1/scan/docker` to receiving the "
        f"`GET /api/v1/scans/{{id}}?include_findings=false&wait={LONG_POLL_SECONDS}` (long poll, "
        "answered when the scan ends) that shows `completed`, on one keep-alive connection. "
        "Bare time: the Trivy process "
        "from start to exit.",
        "Server-side ratio: the scan's `completed_at - created_at` over the bare time of its pair "
        "(no HTTP and no polling delay).",
        "Bare Trivy with SecAPI's Go settings: the same command with the GOGC and GOMEMLIMIT "
        f"that SecAPI's local executor sets ({_format_environment(go_environment(bed))}); "
        "SecAPI against it is the cost of SecAPI alone. Plain bare Trivy runs with Go's "
        "defaults, as a user would run it.",
        "Bare FastAPI running Trivy: bench/bare_app.py's endpoints that start the same Trivy "
        "command with the same GOGC and GOMEMLIMIT per POST and answer the long poll when it "
        "exits, after reading the report file; no database and no checks, served by uvicorn on "
        "127.0.0.1 and timed by the same client code. The four sides rotate their order.",
        "Images: `fixtures/alpine:3.17` (12 findings) and `fixtures/many-findings:1.0` (3,200), "
        f"each a few kilobytes, and `{system_image.REPOSITORY}:{system_image.TAG}`, an image of "
        "typical size built for the run from this machine's Debian package database and "
        "`/usr/lib/python3*` under the fixture Debian's os-release. Trivy keeps no layer "
        "cache between scans (`--cache-backend memory`), so every scan of it reads the "
        "whole layer, as the first scan of a new image does.",
    ]
    return PartResult(
        part="overhead", title=TITLE, method=method, figures=figures, rows=rows, targets=targets
    )


def _format_environment(environment: dict[str, str]) -> str:
    return ", ".join(f"{name}={value}" for name, value in sorted(environment.items()))
