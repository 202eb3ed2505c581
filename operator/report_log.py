"""Carry Trivy's JSON report from the scan pod to the operator through the pod log.

The scan container runs `SCAN_SCRIPT` with `/bin/sh -c`. Trivy writes its
report to a file. The script then prints the file gzip-compressed and
base64-encoded between two marker lines, which carry the report's byte count
and SHA-256. The log is the only channel: scan pods mount no service account token
and talk to nothing but the registry.

A log can lose lines (rotation by the kubelet, a size limit, a node that went
away), so `decode_report_log` accepts a report only when both markers are
present and the decoded bytes match the declared size and digest; anything
else is a failed scan, never a partial result.

NOTE: a kubelet rotates container logs past its containerLogMaxSize (10Mi by
default), so a report whose encoded block is larger fails as ReportTruncated
on such nodes; gzip keeps typical reports far below that, but huge images
need a larger log size on the node.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from dataclasses import dataclass

# Version of the block format, printed in both marker lines.
FORMAT_VERSION = "v1"
BEGIN_MARKER = "SECAPI-REPORT-BEGIN"
END_MARKER = "SECAPI-REPORT-END"

# Environment variable with the folder (an emptyDir) where the script writes.
WORK_DIR_VARIABLE = "SECAPI_WORK_DIR"

# $1 is the image reference, the remaining arguments are Trivy's flags. The
# reference is only ever expanded inside double quotes, after `--`, so Trivy
# cannot read it as a flag and the shell never splits or evaluates it. Only
# commands that busybox provides are used (the scanner image is Alpine-based).
# NB: Kubernetes expands `$(NAME)` in command and args when NAME is a variable
# of the container, so the script uses `$(` only before a space or `(`.
SCAN_SCRIPT = f"""\
set -u
image="$1"
shift
work="${WORK_DIR_VARIABLE}"
report="$work/report.json"
mkdir -p "$work/tmp" "$work/cache" || exit 70
rm -f "$report"
trivy image "$@" --format json --output "$report" -- "$image"
code=$?
if [ "$code" -ne 0 ]; then
  echo "secapi-scan: trivy exited with status $code" >&2
  exit "$code"
fi
if [ ! -s "$report" ]; then
  echo "secapi-scan: trivy exited with status 0 but wrote no report" >&2
  exit 65
fi
bytes=$( wc -c < "$report" | tr -d ' ' )
sum=$( sha256sum < "$report" )
sum="${{sum%% *}}"
echo "{BEGIN_MARKER} {FORMAT_VERSION} bytes=$bytes sha256=$sum encoding=gzip+base64"
gzip -c < "$report" | base64 || exit 74
echo "{END_MARKER} {FORMAT_VERSION} bytes=$bytes sha256=$sum"
"""

_BEGIN = re.compile(
    rf"^{BEGIN_MARKER} (?P<version>\S+) bytes=(?P<bytes>[0-9]+) "
    r"sha256=(?P<sha256>[0-9a-f]{64}) encoding=(?P<encoding>\S+)$"
)
_END = re.compile(
    rf"^{END_MARKER} (?P<version>\S+) bytes=(?P<bytes>[0-9]+) sha256=(?P<sha256>[0-9a-f]{{64}})$"
)


class ReportLogError(Exception):
    """The pod log contains no complete, intact report.

    `too_large` is set when the report exceeds the accepted size, so callers
    can tell a refused report from a damaged one.
    """

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.too_large = too_large


@dataclass(frozen=True)
class DecodedReport:
    """A report that passed every check, with what the script declared about it."""

    data: bytes
    sha256: str


def _block_lines(log: bytes) -> tuple[re.Match[str], list[bytes], re.Match[str] | None]:
    """Split the log into the last BEGIN marker, the lines after it and the END marker."""
    lines = log.split(b"\n")
    begin_index = None
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith(BEGIN_MARKER.encode()):
            begin_index = index
            break
    if begin_index is None:
        raise ReportLogError(
            "the pod log contains no report: its beginning marker is missing, so the log "
            "was cut, rotated or the scan script did not run"
        )

    begin = _BEGIN.match(lines[begin_index].decode("ascii", "replace").rstrip("\r"))
    if begin is None:
        raise ReportLogError("the report's beginning marker line of the pod log is damaged")

    body: list[bytes] = []
    for line in lines[begin_index + 1 :]:
        text = line.rstrip(b"\r")
        if text.startswith(END_MARKER.encode()):
            return begin, body, _END.match(text.decode("ascii", "replace"))
        body.append(text)
    return begin, body, None


def decode_report_log(log: bytes, *, max_report_bytes: int) -> DecodedReport:
    """Return the report carried by a scan pod's log, verified.

    Raises `ReportLogError` when a marker is missing or damaged, the base64 or
    gzip data is cut or corrupt, the size or SHA-256 differs from the declared
    one, or the report is larger than `max_report_bytes` (with `too_large`).
    """
    begin, body, end = _block_lines(log)
    if end is None:
        raise ReportLogError(
            "the pod log ends inside the report: its end marker is missing, so the log was cut"
        )
    if begin["version"] != FORMAT_VERSION or begin["encoding"] != "gzip+base64":
        raise ReportLogError(
            f"the report block has format {begin['version']} with encoding "
            f"{begin['encoding']}; this operator reads {FORMAT_VERSION} with gzip+base64, "
            "so the scanner image and the operator are from different releases"
        )
    if (end["bytes"], end["sha256"]) != (begin["bytes"], begin["sha256"]):
        raise ReportLogError("the report's end marker does not match its beginning marker")

    declared_bytes = int(begin["bytes"])
    if declared_bytes > max_report_bytes:
        raise ReportLogError(
            f"the report has {declared_bytes} bytes, more than the maximum of "
            f"{max_report_bytes} bytes; raise the maximum report size or scan with fewer "
            "scanners or severities",
            too_large=True,
        )

    try:
        compressed = base64.b64decode(b"".join(body), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ReportLogError(f"the report's base64 data is damaged ({error})") from error

    data = _gunzip(compressed, limit=declared_bytes)
    if len(data) != declared_bytes:
        raise ReportLogError(
            f"the report has {len(data)} bytes but the scan declared {declared_bytes}, "
            "so part of it was lost"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != begin["sha256"]:
        raise ReportLogError(
            f"the report's SHA-256 is {digest} but the scan declared {begin['sha256']}, "
            "so it was altered or damaged on the way"
        )
    return DecodedReport(data=data, sha256=digest)


def _gunzip(compressed: bytes, *, limit: int) -> bytes:
    """Decompress gzip data, stopping one byte past `limit` so a bomb costs no memory."""
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = decompressor.decompress(compressed, limit + 1)
    except zlib.error as error:
        raise ReportLogError(f"the report's gzip data is damaged ({error})") from error
    if len(data) <= limit and not decompressor.eof:
        raise ReportLogError("the report's gzip data ends early, so part of it was lost")
    return data
