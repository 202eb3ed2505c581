"""Container log files: written line by line like a container runtime, read like a kubelet.

Each run of a container writes one file of records in the CRI log format that
containerd uses: `<timestamp> <stream> <tag> <content>`, one per line. The
timestamp is RFC 3339 with nanoseconds in UTC, and the stream is `stdout` or
`stderr`. The tag is `F` for a full line, or `P` for a part of a line that
continues in the next record of the same stream. Reading applies the options
of `GET /containerLogs`: `sinceTime`/`sinceSeconds`, `stream`, `tailLines`,
`timestamps`, `limitBytes` and `follow`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# Output longer than this without a newline is stored as partial records, so
# a process that prints megabytes on one line never keeps them all in memory.
MAX_RECORD_BYTES = 64 * 1024

STREAMS = ("stdout", "stderr")


def format_timestamp(nanoseconds: int) -> str:
    """Format Unix nanoseconds as RFC 3339 with exactly nine fraction digits.

    The fixed width makes the strings sort like the times they stand for.
    """
    seconds, fraction = divmod(nanoseconds, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def timestamp_of(moment: datetime) -> str:
    """Format a timezone-aware datetime like `format_timestamp`."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + f".{utc.microsecond * 1000:09d}Z"


class ContainerLog:
    """The log file of one container run while its process writes output."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "ab")
        self._pending = {stream: b"" for stream in STREAMS}
        self._changed = threading.Condition()
        self.size = self._file.tell()
        self.closed = False

    def feed(self, stream: str, data: bytes) -> None:
        """Store output of one stream; whole lines become records at once."""
        stamp = format_timestamp(time.time_ns()).encode()
        prefix_full = stamp + b" " + stream.encode() + b" F "
        prefix_part = stamp + b" " + stream.encode() + b" P "

        *lines, rest = (self._pending[stream] + data).split(b"\n")
        records = [prefix_full + line + b"\n" for line in lines]
        while len(rest) > MAX_RECORD_BYTES:
            records.append(prefix_part + rest[:MAX_RECORD_BYTES] + b"\n")
            rest = rest[MAX_RECORD_BYTES:]
        self._pending[stream] = rest
        self._write(b"".join(records))

    def end_stream(self, stream: str) -> None:
        """Store what is left of a stream that ended without a newline."""
        rest, self._pending[stream] = self._pending[stream], b""
        if rest:
            stamp = format_timestamp(time.time_ns()).encode()
            self._write(stamp + b" " + stream.encode() + b" P " + rest + b"\n")

    def close(self) -> None:
        """Mark the log complete; followers stop once they have read it all."""
        for stream in STREAMS:
            self.end_stream(stream)
        with self._changed:
            self._file.close()
            self.closed = True
            self._changed.notify_all()

    def wait_beyond(self, size: int, timeout: float) -> None:
        """Block until the file grows past `size` bytes, the log closes, or `timeout` passes."""
        with self._changed:
            if self.size <= size and not self.closed:
                self._changed.wait(timeout)

    def _write(self, data: bytes) -> None:
        if not data:
            return
        with self._changed:
            self._file.write(data)
            self._file.flush()
            self.size += len(data)
            self._changed.notify_all()


@dataclass(frozen=True)
class Record:
    timestamp: bytes
    stream: str
    complete: bool
    content: bytes


def parse_records(data: bytes) -> list[Record]:
    """Split a log file's bytes into records; an unfinished last record is left out."""
    records = []
    for line in data.split(b"\n")[:-1]:
        parts = line.split(b" ", 3)
        if len(parts) < 3:
            continue
        content = parts[3] if len(parts) == 4 else b""
        records.append(Record(parts[0], parts[1].decode(), parts[2] == b"F", content))
    return records


@dataclass
class LogOptions:
    """The query of one log request, as `GET /containerLogs` takes it."""

    tail_lines: int | None = None
    limit_bytes: int | None = None
    timestamps: bool = False
    follow: bool = False
    since: str | None = None  # a timestamp as format_timestamp writes it
    stream: str = "All"

    def wants(self, record: Record) -> bool:
        if self.stream != "All" and record.stream != self.stream.lower():
            return False
        return self.since is None or record.timestamp.decode() >= self.since


def _logical_lines(records: list[Record]) -> list[list[Record]]:
    """Group records into lines: a partial record continues in its stream's next record."""
    lines: list[list[Record]] = []
    open_line: dict[str, list[Record]] = {}
    for record in records:
        line = open_line.get(record.stream)
        if line is None:
            line = []
            lines.append(line)
        line.append(record)
        if record.complete:
            open_line.pop(record.stream, None)
        else:
            open_line[record.stream] = line
    return lines


def _render_line(line: list[Record], timestamps: bool) -> bytes:
    content = b"".join(record.content for record in line)
    if line[-1].complete:
        content += b"\n"
    return (line[0].timestamp + b" " + content) if timestamps else content


def render(records: list[Record], options: LogOptions, *, truncate: bool = False) -> bytes:
    """Return the bytes a log request gets for a finished set of records.

    `truncate` keeps only the first half of the output bytes (the truncate-log
    fault); it applies before the request's own options.
    """
    lines = _logical_lines(records)
    if truncate:
        total = sum(len(_render_line(line, False)) for line in lines)
        keep = total // 2
        kept: list[list[Record]] = []
        for line in lines:
            size = len(_render_line(line, False))
            if size <= keep:
                kept.append(line)
                keep -= size
                continue
            # Cut inside this line; what is left has no newline.
            if keep > 0:
                content = b"".join(record.content for record in line)[:keep]
                kept.append([Record(line[0].timestamp, line[0].stream, False, content)])
            break
        lines = kept

    lines = [line for line in lines if options.wants(line[0])]
    if options.tail_lines is not None:
        lines = lines[-options.tail_lines :] if options.tail_lines > 0 else []
    output = b"".join(_render_line(line, options.timestamps) for line in lines)
    if options.limit_bytes is not None:
        output = output[: options.limit_bytes]
    return output


def read_log(path: Path, options: LogOptions, *, truncate: bool = False) -> bytes:
    """Return a log file's content as a request with `options` gets it."""
    return render(parse_records(path.read_bytes()), options, truncate=truncate)


def follow_log(
    path: Path,
    log: ContainerLog | None,
    options: LogOptions,
    *,
    truncate: bool = False,
    stopped: threading.Event,
) -> Iterator[bytes]:
    """Yield a log's content, then new output as it is written, until the log closes.

    With `truncate`, the whole output is sent once the log is complete, since
    half of a log cannot be known before its end.
    """
    if log is None or not options.follow:
        yield read_log(path, options, truncate=truncate)
        return
    if truncate:
        while not log.closed and not stopped.is_set():
            log.wait_beyond(log.size, timeout=1.0)
        yield read_log(path, options, truncate=True)
        return

    with open(path, "rb") as file:
        # The first part honours tailLines; later output streams as it comes.
        data = file.read()
        cut = data.rfind(b"\n") + 1
        records = parse_records(data[:cut])
        file.seek(cut)
        output = render(records, options)
        remaining = None if options.limit_bytes is None else options.limit_bytes - len(output)
        if output:
            yield output
        line_open = {record.stream: not record.complete for record in records}

        while remaining is None or remaining > 0:
            if stopped.is_set():
                return
            position = file.tell()
            log.wait_beyond(position, timeout=1.0)
            data = file.read()
            cut = data.rfind(b"\n") + 1
            file.seek(position + cut)
            chunk = b""
            for record in parse_records(data[:cut]):
                if not options.wants(record):
                    continue
                if options.timestamps and not line_open.get(record.stream):
                    chunk += record.timestamp + b" "
                chunk += record.content + (b"\n" if record.complete else b"")
                line_open[record.stream] = not record.complete
            if remaining is not None:
                chunk = chunk[:remaining]
                remaining -= len(chunk)
            if chunk:
                yield chunk
            if not data and log.closed:
                return
