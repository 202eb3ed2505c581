"""The kubelet's HTTPS endpoint: container logs for the API server, and a health check.

kube-apiserver forwards `GET pods/NAME/log` to
`https://<InternalIP>:<daemonEndpoints port>/containerLogs/NS/POD/CONTAINER`.
Without `--kubelet-certificate-authority` it does not verify the serving
certificate, so a self-signed one made at start is enough.

NOTE: the endpoint does not authenticate clients, unlike a real kubelet. It
binds 127.0.0.1 only and serves nothing but logs of test pods.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .logs import LogOptions, format_timestamp, timestamp_of

logger = logging.getLogger(__name__)


def make_certificate(folder: Path, node_name: str) -> tuple[Path, Path]:
    """Write a new self-signed serving certificate and its key; return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{node_name}@{int(time.time())}")]
    )
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(node_name),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "kubelet.crt", folder / "kubelet.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class LogRequestError(Exception):
    """A log request cannot be served; the message goes to the client as it is."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LogRequest:
    namespace: str
    pod: str
    container: str
    previous: bool
    options: LogOptions


# Returns the chunks of the response to a log request, or raises LogRequestError.
LogSource = Callable[[LogRequest, threading.Event], Iterator[bytes]]


def _parse_options(query: dict[str, list[str]]) -> tuple[LogOptions, bool]:
    def one(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    def number(name: str) -> int | None:
        value = one(name)
        if value is None:
            return None
        try:
            parsed = int(value)
        except ValueError as error:
            raise LogRequestError(400, f"invalid {name} {value!r}: write a whole number") from error
        if parsed < 0:
            raise LogRequestError(400, f"invalid {name} {value!r}: it must not be negative")
        return parsed

    def flag(name: str) -> bool:
        return (one(name) or "false").lower() in ("true", "1")

    since = None
    since_seconds = number("sinceSeconds")
    since_time = one("sinceTime")
    if since_seconds is not None:
        since = format_timestamp(time.time_ns() - since_seconds * 1_000_000_000)
    elif since_time is not None:
        try:
            since = timestamp_of(datetime.datetime.fromisoformat(since_time.replace("Z", "+00:00")))
        except ValueError as error:
            raise LogRequestError(400, f"invalid sinceTime {since_time!r}: use RFC 3339") from error

    stream = one("stream") or "All"
    if stream not in ("All", "Stdout", "Stderr"):
        raise LogRequestError(400, f"invalid stream {stream!r}: use All, Stdout or Stderr")
    options = LogOptions(
        tail_lines=number("tailLines"),
        limit_bytes=number("limitBytes"),
        timestamps=flag("timestamps"),
        follow=flag("follow"),
        since=since,
        stream=stream,
    )
    return options, flag("previous")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LogServer
    # Seconds an idle keep-alive connection stays open.
    timeout = 120

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            self._send_text(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._send_text(
                404,
                f"{url.path} not found: the test bed kubelet serves only /containerLogs and /healthz",
            )
            return

        try:
            options, previous = _parse_options(parse_qs(url.query))
            request = LogRequest(parts[1], parts[2], parts[3], previous, options)
            chunks = self.server.source(request, self.server.stopped)
            first = next(chunks, b"")
        except LogRequestError as error:
            self._send_text(error.status, str(error))
            return

        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if not options.follow:
            body = first + b"".join(chunks)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return

        # A followed log has no known length, so it goes out in chunks.
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._write_chunk(first)
            for chunk in chunks:
                self._write_chunk(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            # The client stopped following; nothing is left to do.
            self.close_connection = True
        finally:
            chunks.close()  # type: ignore[attr-defined]

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    def _send_text(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("Log server: " + format, *args)


class LogServer(ThreadingHTTPServer):
    """The HTTPS server; `serve_forever` runs in its own thread."""

    daemon_threads = True

    def __init__(self, port: int, cert: Path, key: Path, source: LogSource) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        # The handshake happens in each connection's thread, not in accept().
        self.socket = context.wrap_socket(
            self.socket, server_side=True, do_handshake_on_connect=False
        )
        self.source = source
        self.stopped = threading.Event()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def shutdown(self) -> None:
        self.stopped.set()
        super().shutdown()
