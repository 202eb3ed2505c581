"""Write a run's figures to bench/results/latest.json and a dated section of BENCHMARKS.md.

latest.json keeps the newest figures of every part: a run of some parts
replaces those parts and keeps the others, each stamped with the time it was
measured. BENCHMARKS.md keeps its hand-written head and gets one section per
run inserted below the marker line, newest first.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.results import PartResult

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
LATEST = RESULTS_DIR / "latest.json"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"
MARKER = "<!-- bench: runs below, newest first; `make bench` inserts each new run here -->"
SCHEMA_VERSION = 1


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json(
    path: Path,
    *,
    run: dict[str, Any],
    machine: dict[str, Any],
    versions: dict[str, Any],
    parts: list[PartResult],
    merge: bool,
) -> dict[str, Any]:
    """Write the run's results to `path`, keeping other parts' figures when `merge` is true."""
    previous: dict[str, Any] = {}
    if merge and path.exists():
        try:
            previous = json.loads(path.read_text()).get("parts", {})
        except ValueError:
            previous = {}
    merged = dict(previous)
    for result in parts:
        entry = result.to_json()
        entry["run_started_at"] = run["started_at"]
        merged[result.part] = entry
    document = {
        "schema_version": SCHEMA_VERSION,
        "run": run,
        "machine": machine,
        "versions": versions,
        "parts": merged,
    }
    _write_atomically(path, json.dumps(document, indent=2, sort_keys=False) + "\n")
    return document


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_section(
    *,
    run: dict[str, Any],
    machine: dict[str, Any],
    versions: dict[str, Any],
    parts: list[PartResult],
) -> str:
    started = datetime.fromisoformat(run["started_at"])
    names = ", ".join(result.part for result in parts)
    packages = versions["python_packages"]
    lines = [
        f"## {started:%Y-%m-%d %H:%M} UTC: {names}",
        "",
        f"Command: `{run['command']}`, {run['duration_seconds']:.0f} s in all. "
        f"Commit `{versions['git']['commit'][:12]}`"
        + (" with uncommitted changes" if versions["git"]["uncommitted_changes"] else "")
        + ". Rerun with `make bench`, or `.venv/bin/python -m bench PART ...` on a running "
        "test bed.",
        "",
        f"- Machine: {machine['cpu_model']}, {machine['logical_cores']} cores, "
        f"{machine['memory_gib']} GiB memory, {machine['os']}, Linux {machine['kernel']}; "
        f"load average {machine['load_average_at_start'][0]} at the start, "
        f"{run['load_average_at_end'][0]} at the end.",
        f"- Versions: Python {versions['python']}, Trivy {versions['trivy']}, "
        f"Kubernetes {versions['kubernetes']}, PostgreSQL {versions['postgresql']}, "
        f"FastAPI {packages['fastapi']}, uvicorn {packages['uvicorn']}, "
        f"SQLAlchemy {packages['sqlalchemy']}, Kopf {packages['kopf']}.",
        "",
    ]
    for result in parts:
        lines += _render_part(result)
    return "\n".join(lines)


def _render_part(result: PartResult) -> list[str]:
    lines = [f"### {result.title}", ""]
    if result.error:
        return [*lines, f"Failed after {result.duration_seconds:.0f} s: {result.error}", ""]
    lines += [f"- {sentence}" for sentence in result.method]
    lines.append("")
    if result.rows:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {_escape(name)} | {_escape(value)} |" for name, value in result.rows]
        lines.append("")
    if result.targets:
        lines += ["| target | measured | met |", "|---|---|---|"]
        for target in result.targets:
            limit = f"{target.comparison} {target.limit:g} {target.unit}".strip()
            value = f"{target.value:.4g} {target.unit}".strip()
            lines.append(
                f"| {_escape(target.name)} {limit} | {value} | {'yes' if target.met else '**no**'} |"
            )
        lines.append("")
    for note in result.notes:
        lines.append(f"Note: {note}")
        lines.append("")
    return lines


def insert_section(path: Path, section: str) -> None:
    """Insert `section` below the marker of BENCHMARKS.md, adding the marker when missing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARKER not in text:
        text = text.rstrip("\n") + "\n\n" + MARKER + "\n"
    head, tail = text.split(MARKER, 1)
    older = tail.strip("\n")
    text = head + MARKER + "\n\n" + section.strip("\n") + "\n"
    if older:
        text += "\n" + older + "\n"
    _write_atomically(path, text)
