"""`secapi scan IMAGE`: a SecAPI client for CI pipelines.

It submits a scan. With --wait it long-polls the scan (GET with ``wait``) until
it is completed or failed, then prints the result and sets the exit code. The code
is 0 when nothing reaches the --fail-on severity and 1 when something does,
in which case up to 20 of those findings are listed on stderr.
It is 2 when the scan failed or timed out, or the server could not be used. The API key comes
from an environment variable and is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx

SEVERITIES = ("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
SUMMARY_FIELDS = {
    "CRITICAL": "critical",
    "HIGH": "high",
    "MEDIUM": "medium",
    "LOW": "low",
    "UNKNOWN": "unknown",
}
FINAL_STATUSES = ("completed", "failed")
EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
# Seconds each long poll requests the server to wait. The server allows up to 60.
LONG_POLL_SECONDS = 25
# Seconds the HTTP read timeout allows past the long poll's wait.
LONG_POLL_GRACE_SECONDS = 15.0
# Polling with backoff, for an older server that ignores `wait` and returns at once.
FIRST_POLL_DELAY = 1.0
MAX_POLL_DELAY = 15.0
POLL_BACKOFF = 1.5
# At most this many findings are listed in the table; the counts are always complete.
TABLE_ROWS = 100
# A 429 asking for a longer wait than this ends the command instead of blocking a pipeline.
MAX_RETRY_AFTER_SECONDS = 60
# Retries of one request after 429 responses.
RATE_LIMIT_RETRIES = 5
# While waiting, a server that cannot be reached is tried again after these many seconds,
# growing to the maximum, until --timeout: a restart or a redeploy must not fail the wait.
FIRST_RECONNECT_DELAY = 1.0
MAX_RECONNECT_DELAY = 10.0
# Statuses a proxy or a starting server sends for a server that is briefly away.
UNAVAILABLE_STATUSES = (502, 503, 504)
# At most this many findings are listed on stderr when the --fail-on threshold is reached.
OFFENDING_LINES = 20
FINDING_KINDS = ("vulnerabilities", "secrets", "misconfigurations")


class ScanClientError(Exception):
    """A failure that ends the command with exit code 2."""


class ServerUnavailableError(ScanClientError):
    """A 502, 503 or 504: a proxy in front of a server that restarts, or a server not ready."""


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image reference, e.g. registry.example.com/app:1.2")
    parser.add_argument(
        "--url",
        default=os.environ.get("SECAPI_URL", "http://127.0.0.1:8000"),
        help="SecAPI server URL (default: $SECAPI_URL or %(default)s)",
    )
    parser.add_argument(
        "--api-key-env",
        default="SECAPI_API_KEY",
        metavar="NAME",
        help="environment variable that contains the API key (default: %(default)s)",
    )
    parser.add_argument("--wait", action="store_true", help="wait until the scan ends")
    parser.add_argument(
        "--fail-on",
        type=str.upper,
        choices=SEVERITIES,
        metavar="SEVERITY",
        help="exit 1 when a finding has this severity or a higher one (implies --wait); "
        "one of " + ", ".join(SEVERITIES),
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="give up waiting after this many seconds and exit 2 (default: %(default)g)",
    )
    parser.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="output on stdout: table (a summary and the vulnerabilities at or above "
        "--fail-on, for people) or json (the scan as GET /api/v1/scans/ID returns it, "
        "for scripts); default: %(default)s",
    )
    parser.add_argument(
        "--scanners",
        type=lambda value: [part.strip() for part in value.split(",") if part.strip()],
        metavar="LIST",
        help="comma-separated scanners: vuln, secret, misconfig, license",
    )
    parser.add_argument(
        "--severities",
        type=lambda value: [part.strip().upper() for part in value.split(",") if part.strip()],
        metavar="LIST",
        help="comma-separated severities to report, e.g. HIGH,CRITICAL",
    )
    parser.add_argument("--ignore-unfixed", action="store_true", help="skip unfixed findings")
    parser.add_argument("--platform", help="image platform, e.g. linux/arm64")
    parser.set_defaults(handler=run_scan_command)


def run_scan_command(args: argparse.Namespace) -> int:
    key = os.environ.get(args.api_key_env, "").strip()
    if not key:
        print(
            f"secapi: no API key: set the environment variable {args.api_key_env} "
            "(or name another one with --api-key-env)",
            file=sys.stderr,
        )
        return EXIT_ERROR

    try:
        with httpx.Client(
            base_url=args.url.rstrip("/"),
            headers={"X-API-Key": key, "User-Agent": "secapi-cli"},
            timeout=30.0,
        ) as client:
            return _scan(client, args)
    except ScanClientError as error:
        print(f"secapi: {error}", file=sys.stderr)
        return EXIT_ERROR
    except httpx.TransportError as error:
        print(
            f"secapi: cannot reach a SecAPI server at {args.url} ({type(error).__name__}); "
            "check --url or SECAPI_URL, and that the server is running",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except httpx.HTTPError as error:
        print(f"secapi: request to {args.url} failed: {type(error).__name__}", file=sys.stderr)
        return EXIT_ERROR


def _scan(client: httpx.Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"image": args.image}
    if args.scanners:
        body["scanners"] = args.scanners
    if args.severities:
        body["severities"] = args.severities
    if args.ignore_unfixed:
        body["ignore_unfixed"] = True
    if args.platform:
        body["platform"] = args.platform

    accepted = _request(client, "POST", "/api/v1/scan/docker", json=body)
    scan_id = str(accepted["scan_id"])
    if not (args.wait or args.fail_on):
        _print(args, accepted, f"scan {scan_id} submitted for {args.image}: {accepted['status']}")
        return EXIT_OK

    print(f"secapi: scan {scan_id} submitted for {args.image}, waiting", file=sys.stderr)
    scan = _wait(client, scan_id, timeout=args.timeout)
    if scan["status"] == "failed":
        if args.format == "json":
            print(json.dumps(scan, indent=2))
        # On stderr like every other error, so a script that reads stdout gets none mixed in.
        print(
            f"secapi: scan {scan_id} failed: {scan.get('reason')}: {scan.get('message')}",
            file=sys.stderr,
        )
        return EXIT_ERROR

    counts = _counts_at_or_above(client, scan, args.fail_on) if args.fail_on else {}
    if args.format == "json":
        print(json.dumps(_request(client, "GET", f"/api/v1/scans/{scan_id}"), indent=2))
    else:
        _print_table(client, scan, args.fail_on)

    total = sum(counts.values())
    if args.fail_on and total > 0:
        found = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)
        print(f"secapi: {found} at {args.fail_on} or above:", file=sys.stderr)
        lines = _offending_lines(client, scan, args.fail_on, counts)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        if total > len(lines):
            print(f"  ... and {total - len(lines)} more", file=sys.stderr)
        return EXIT_FINDINGS
    return EXIT_OK


def _wait(client: httpx.Client, scan_id: str, *, timeout: float) -> dict[str, Any]:
    """Long-poll the scan (GET ...?wait=N) until it ends or ``timeout`` seconds pass.

    A server that answers an active scan before the wait is up does not know
    ``wait``; then the loop falls back to polling with backoff. A server that
    cannot be reached, or that a proxy reports unavailable, is tried again until
    ``timeout``: it may be restarting, and the scan goes on without it.
    """
    deadline = time.monotonic() + timeout
    delay = FIRST_POLL_DELAY
    reconnect_delay = FIRST_RECONNECT_DELAY
    while True:
        wait = max(0, min(LONG_POLL_SECONDS, int(deadline - time.monotonic())))
        requested_at = time.monotonic()
        try:
            scan = _request(
                client,
                "GET",
                f"/api/v1/scans/{scan_id}?include_findings=false&wait={wait}",
                timeout=wait + LONG_POLL_GRACE_SECONDS,
            )
        except (httpx.TransportError, ServerUnavailableError) as error:
            if time.monotonic() + reconnect_delay > deadline:
                raise
            reason = type(error).__name__ if isinstance(error, httpx.TransportError) else error
            print(
                f"secapi: the server is unavailable ({reason}); trying again in "
                f"{reconnect_delay:g} s",
                file=sys.stderr,
            )
            time.sleep(reconnect_delay)
            reconnect_delay = min(reconnect_delay * 2, MAX_RECONNECT_DELAY)
            continue
        reconnect_delay = FIRST_RECONNECT_DELAY
        if scan["status"] in FINAL_STATUSES:
            return scan
        if time.monotonic() + delay > deadline:
            raise ScanClientError(
                f"scan {scan_id} did not end within {timeout:g} s (status {scan['status']}); "
                "raise --timeout, or look it up later with GET /api/v1/scans/" + scan_id
            )
        if time.monotonic() - requested_at < wait:
            time.sleep(delay)
            delay = min(delay * POLL_BACKOFF, MAX_POLL_DELAY)


def _counts_at_or_above(
    client: httpx.Client, scan: dict[str, Any], threshold: str
) -> dict[str, int]:
    """Count vulnerabilities, secrets and misconfigurations at or above the threshold."""
    wanted = SEVERITIES[SEVERITIES.index(threshold) :]
    summary = scan.get("summary") or {}
    counts = {
        "vulnerabilities": sum(int(summary.get(SUMMARY_FIELDS[level], 0)) for level in wanted),
        "secrets": 0,
        "misconfigurations": 0,
    }
    # The summary counts secrets and misconfigurations without severities, so ask per severity.
    for kind in ("secrets", "misconfigurations"):
        if not summary.get(kind):
            continue
        for level in wanted:
            page = _request(
                client,
                "GET",
                f"/api/v1/scans/{scan['scan_id']}/{kind}?severity={level}&page_size=1",
            )
            counts[kind] += int(page["total"])
    return counts


def _offending_lines(
    client: httpx.Client, scan: dict[str, Any], threshold: str, counts: dict[str, int]
) -> list[str]:
    """Describe up to OFFENDING_LINES findings at or above the threshold, most severe first."""
    lines: list[str] = []
    for kind in FINDING_KINDS:
        for level in reversed(SEVERITIES[SEVERITIES.index(threshold) :]):
            room = OFFENDING_LINES - len(lines)
            if room <= 0 or not counts.get(kind):
                break
            page = _request(
                client,
                "GET",
                f"/api/v1/scans/{scan['scan_id']}/{kind}?severity={level}&page_size={room}",
            )
            lines += [describe_finding(kind, item) for item in page["items"]]
    return lines


def describe_finding(kind: str, item: dict[str, Any]) -> str:
    """Return one line naming a finding: its severity, id, and package or location."""
    severity = str(item.get("severity") or "UNKNOWN").ljust(8)
    if kind == "secrets":
        where = str(item.get("target") or "?")
        if item.get("start_line") is not None:
            where += f":{item['start_line']}"
        return f"{severity} secret {item.get('rule_id')} in {where}"
    if kind == "misconfigurations":
        return f"{severity} misconfiguration {item.get('id')} in {item.get('target') or '?'}"
    where = f"{item.get('package') or '?'} {item.get('installed_version') or ''}".rstrip()
    if item.get("package_path"):
        where += f" ({item['package_path']})"
    return f"{severity} {item.get('id')} in {where}"


def _print_table(client: httpx.Client, scan: dict[str, Any], threshold: str | None) -> None:
    summary = scan.get("summary") or {}
    print(f"scan {scan['scan_id']}: {scan['image']} {scan['status']}")
    print(
        "vulnerabilities: "
        + ", ".join(f"{summary.get(field, 0)} {field}" for field in SUMMARY_FIELDS.values())
        + f"; secrets: {summary.get('secrets', 0)}"
        + f"; misconfigurations: {summary.get('misconfigurations', 0)}"
    )
    levels = SEVERITIES[SEVERITIES.index(threshold) :] if threshold else SEVERITIES
    rows: list[dict[str, Any]] = []
    for level in reversed(levels):
        if len(rows) >= TABLE_ROWS or not summary.get(SUMMARY_FIELDS[level]):
            continue
        page = _request(
            client,
            "GET",
            f"/api/v1/scans/{scan['scan_id']}/vulnerabilities"
            f"?severity={level}&page_size={min(100, TABLE_ROWS - len(rows))}",
        )
        rows += page["items"]
    if not rows:
        return
    # The path distinguishes copies of one package. OS packages have none, so the target is shown.
    columns = ("severity", "id", "package", "installed_version", "fixed_version", "path")
    table = [
        [str(row.get(column) or "") for column in columns[:-1]]
        + [str(row.get("package_path") or row.get("target") or "")]
        for row in rows
    ]
    widths = [
        max(len(column), *(len(line[i]) for line in table)) for i, column in enumerate(columns)
    ]
    print()
    print(
        "  ".join(
            column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)
        ).rstrip()
    )
    for line in table:
        print(
            "  ".join(
                value.ljust(width) for value, width in zip(line, widths, strict=True)
            ).rstrip()
        )
    listed = sum(int(summary.get(SUMMARY_FIELDS[level], 0)) for level in levels)
    if listed > len(rows):
        print(
            f"... and {listed - len(rows)} more; list them all with "
            f"GET /api/v1/scans/{scan['scan_id']}/vulnerabilities or --format json"
        )


def _print(args: argparse.Namespace, document: dict[str, Any], text: str) -> None:
    print(json.dumps(document, indent=2) if args.format == "json" else text)


def _request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """Send a request and return the JSON body of a success.

    A 429 whose Retry-After is at most MAX_RETRY_AFTER_SECONDS is waited out and
    retried, up to RATE_LIMIT_RETRIES times. A longer Retry-After (an hourly scan
    limit, for example) raises ScanClientError at once with the server's message.
    """
    for attempt in range(RATE_LIMIT_RETRIES + 1):
        response = client.request(method, path, **kwargs)
        if response.status_code != 429:
            break
        retry_after = _retry_after_seconds(response)
        if retry_after > MAX_RETRY_AFTER_SECONDS or attempt == RATE_LIMIT_RETRIES:
            break
        print(
            f"secapi: {method} {path} was rate limited (429): {_message(response)}; "
            f"retrying in {retry_after} s",
            file=sys.stderr,
        )
        time.sleep(retry_after)
    if response.is_success:
        document: dict[str, Any] = response.json()
        return document
    message = f"{method} {path} failed with status {response.status_code}: {_message(response)}"
    if response.status_code in UNAVAILABLE_STATUSES:
        raise ServerUnavailableError(message)
    raise ScanClientError(message)


def _retry_after_seconds(response: httpx.Response) -> int:
    """Return the 429's Retry-After in whole seconds (at least 1), or 5 when it is missing."""
    try:
        return max(1, int(response.headers.get("Retry-After", "5")))
    except ValueError:
        # An HTTP date instead of seconds: SecAPI never sends one, so wait the default.
        return 5


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase
