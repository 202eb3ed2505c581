"""Command line of the benchmarks: `python -m bench [PART ...] [--quick]`.

Runs the named parts (all of them without names) on the live test bed, then
writes bench/results/latest.json and a dated section of BENCHMARKS.md. A
`--quick` run uses small counts, writes bench/results/quick.json only, and
leaves BENCHMARKS.md alone. `--profile` runs the SecAPI processes under
cProfile (which slows them, so use it to find hot spots, not for figures). Missed targets do not change the exit status:
the figures are the result. Exit status 1 means a part could not be measured.
"""

from __future__ import annotations

import argparse
import importlib
import pstats
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench import report, servers
from bench.bed import BedUnavailableError, connect_bed
from bench.context import RunContext, say
from bench.machine import describe_machine, describe_versions, load_average
from bench.results import PartResult

# Part name -> module with `TITLE` and `run(context) -> PartResult`, in the order they run.
PARTS = {
    "overhead": "bench.overhead",
    "operator": "bench.operator_latency",
    "queue": "bench.queue_throughput",
    "api": "bench.api_load",
    "ingest": "bench.ingest",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure SecAPI against bare Trivy, bare Jobs and a bare FastAPI endpoint "
        "on the test bed, and record the figures in bench/results/latest.json and BENCHMARKS.md.",
    )
    parser.add_argument(
        "parts",
        nargs="*",
        metavar="PART",
        help=f"parts to run, in any order: {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts for trying the benchmarks out; writes bench/results/quick.json only",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the secapi server and operator processes under cProfile; the profiles and "
        "their top functions go to bench/results/profiles/<time>/",
    )
    parser.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the scratch folder (server logs, generated reports) and print its path",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.parts if name not in PARTS]
    if unknown:
        parser.error(f"unknown part {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def run_part(name: str, context: RunContext) -> PartResult:
    module = importlib.import_module(PARTS[name])
    started = time.monotonic()
    measured_at = datetime.now(UTC).isoformat(timespec="seconds")
    say(f"{name}: starting")
    try:
        result: PartResult = module.run(context)
    except Exception as error:
        traceback.print_exc()
        result = PartResult(
            part=name,
            title=module.TITLE,
            method=[],
            figures={},
            error=f"{type(error).__name__}: {error}",
        )
    result.part = name
    result.measured_at = measured_at
    result.duration_seconds = time.monotonic() - started
    say(f"{name}: done in {result.duration_seconds:.0f} s")
    for target in result.targets:
        verdict = "met" if target.met else "MISSED"
        say(
            f"  {target.name}: {target.value:.4g} {target.unit} "
            f"(target {target.comparison} {target.limit:g}) {verdict}"
        )
    if result.error:
        say(f"  failed: {result.error}")
    return result


def summarize_profiles(directory: Path) -> None:
    """Write `<name>.txt` beside each `<name>.prof`: the top functions by own and total time."""
    for profile in sorted(directory.glob("*.prof")):
        with profile.with_suffix(".txt").open("w") as output:
            stats = pstats.Stats(str(profile), stream=output)
            stats.sort_stats("tottime").print_stats(40)
            stats.sort_stats("cumulative").print_stats(60)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [name for name in PARTS if name in args.parts] if args.parts else list(PARTS)
    try:
        bed = connect_bed()
    except BedUnavailableError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2

    started_at = datetime.now(UTC)
    started = time.monotonic()
    machine = describe_machine()
    versions = describe_versions(bed)
    work_dir = Path(tempfile.mkdtemp(prefix="secapi-bench-"))
    profile_dir = None
    if args.profile:
        profile_dir = report.RESULTS_DIR / "profiles" / started_at.strftime("%Y%m%dT%H%M%SZ")
        servers.enable_profiling(profile_dir)
    context = RunContext(bed=bed, work_dir=work_dir, quick=args.quick)
    results: list[PartResult] = []
    try:
        for name in names:
            results.append(run_part(name, context))
    finally:
        # The server and operator logs in the scratch folder explain a failed or interrupted part.
        failed = len(results) < len(names) or any(result.error for result in results)
        if args.keep_work or failed:
            say(f"scratch folder kept: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    if profile_dir is not None:
        summarize_profiles(profile_dir)
        say(f"profiles written to {profile_dir}")

    run = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_seconds": round(time.monotonic() - started, 1),
        "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "parts": names,
        "quick": args.quick,
        "load_average_at_end": load_average(),
    }
    output = report.RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    report.write_json(
        output, run=run, machine=machine, versions=versions, parts=results, merge=not args.quick
    )
    say(f"figures written to {output}")
    if not args.quick:
        section = report.render_section(run=run, machine=machine, versions=versions, parts=results)
        report.insert_section(report.BENCHMARKS_MD, section)
        say(f"section added to {report.BENCHMARKS_MD}")
    return 1 if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
