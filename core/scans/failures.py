"""Turn what a failed Trivy run printed into a failure reason and a safe message.

Trivy v0.74.0 ends a failed run with one log line
``<time> FATAL Fatal error <chain of wrapped errors>``, followed by the
indented lines of a multi-error ("* remote error: GET ...: MANIFEST_UNKNOWN
..."). The reason is picked from registry error codes and Go network errors in
that text. The message keeps Trivy's own words, with the generic wrapper chain
cut, credentials removed and the length capped. Where Trivy's words do not say
what the user did wrong (a reference to an OCI artifact that is not an image),
an explanation comes first.

Both executors use this: the local one on the process's stderr, the operator
on the tail of the scan pod's log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from secapi.core.scans.reasons import FailureReason

MAX_MESSAGE_LENGTH = 1000
# Longer artifact types are cut in the explanation; Trivy's words that follow keep them whole.
MAX_ARTIFACT_TYPE_LENGTH = 200

# Environment variables whose values are credentials Trivy may be given.
SECRET_VARIABLES = (
    "TRIVY_PASSWORD",
    "TRIVY_REGISTRY_TOKEN",
    "TRIVY_TOKEN",
    "TRIVY_USERNAME",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GITHUB_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
)

_FATAL = re.compile(r"^\S*\s*FATAL\s+(?:Fatal error\s+)?(?P<text>.*)$")
_LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\S+\s+(?:DEBUG|INFO|WARN|ERROR)\s")
# Wrappers Trivy puts around errors; they name its call stack, not the cause.
_WRAPPERS = frozenset(
    {
        "run error",
        "image scan error",
        "scan error",
        "init error",
        "DB error",
        "database error",
        "unable to initialize a scan service",
        "unable to initialize an image scan service",
        "unable to initialize artifact",
        "unable to initialize container image",
        "OCI artifact error",
        "scan failed",
        "failed analysis",
        "analyze error",
        "artifact inspection error",
    }
)
_MULTI_ERROR = re.compile(r"\d+ errors? occurred:\s*")
# Trivy v0.74.0's error for a manifest whose artifactType is not a container image.
_UNSUPPORTED_ARTIFACT = re.compile(r'unsupported artifact type "(?P<type>[^"]*)"')
# Trivy v0.74.0's error when --skip-db-update is given and its cache folder has no DB.
_NO_DATABASE = re.compile(r"--skip-db-update cannot be specified on the first run")

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_AUTH_HEADER = re.compile(r"(?i)\b(authorization|proxy-authorization)(\s*[:=]\s*)(\S+\s+)?\S+")
_CREDENTIAL_WORDS = re.compile(
    r"(?i)\b(password|passwd|token|secret|access_token|refresh_token|client_secret)"
    r"(\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&]+)"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")

# Registry error codes (OCI distribution spec) and Go network errors, by reason.
_DATABASE = re.compile(
    r"failed to download vulnerability DB|--skip-db-update cannot be specified|"
    r"the version of DB schema doesn't match|DB error|database error|"
    r"failed to (?:open|initialize) (?:the )?(?:vulnerability )?db|"
    r"failed to download Java DB|Java DB error",
    re.IGNORECASE,
)
_TIMEOUT = re.compile(r"context deadline exceeded|timeout exceeded", re.IGNORECASE)
_NOT_FOUND = re.compile(
    r"MANIFEST_UNKNOWN|NAME_UNKNOWN|manifest unknown|repository name not known|"
    r"no child with platform|no matching manifest for|not found: manifest|404 Not Found",
    re.IGNORECASE,
)
# Case-sensitive on purpose: "DENIED" is a registry error code, "permission denied" a local one.
_AUTH = re.compile(
    r"\bUNAUTHORIZED\b|\bDENIED\b|(?i:authentication required|unauthorized|"
    r"401 Unauthorized|403 Forbidden|incorrect username or password|invalid username/password)"
)
_RATE_LIMITED = re.compile(r"TOOMANYREQUESTS|429 Too Many Requests|rate limit", re.IGNORECASE)
_UNREACHABLE = re.compile(
    r"connection refused|no such host|i/o timeout|network is unreachable|"
    r"connection reset by peer|no route to host|server misbehaving|dial tcp|"
    r"tls: |x509: |http: server gave HTTP response to HTTPS client",
    re.IGNORECASE,
)


def scrub_credentials(text: str, *, secrets: Iterable[str] = ()) -> str:
    """Remove credentials from ``text``: URL user info, auth headers, key=value secrets.

    ``secrets`` are literal values (for example the registry password given to
    Trivy) that are replaced wherever they appear.
    """
    for secret in sorted({value for value in secrets if len(value) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    text = _USERINFO.sub(r"\g<scheme>[redacted]@", text)
    text = _AUTH_HEADER.sub(r"\1\2[redacted]", text)
    text = _BEARER.sub(r"\1 [redacted]", text)
    return _CREDENTIAL_WORDS.sub(r"\1\2[redacted]", text)


def secret_values(environment: Mapping[str, str] | None = None) -> list[str]:
    """Return the credential values in ``environment`` (default: this process's)."""
    environment = os.environ if environment is None else environment
    return [environment[name] for name in SECRET_VARIABLES if environment.get(name)]


def _fatal_text(output: str) -> str:
    """Return the FATAL error with its continuation lines, or the output's last lines."""
    lines = output.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        match = _FATAL.match(lines[index])
        if match is None:
            continue
        parts = [match.group("text")]
        for line in lines[index + 1 :]:
            if _LOG_LINE.match(line):
                break
            parts.append(line.strip())
        return " ".join(part for part in parts if part)
    meaningful = [line.strip() for line in lines if line.strip()]
    return " ".join(meaningful[-5:])


def _drop_wrappers(text: str) -> str:
    """Remove Trivy's wrapper segments and repeated segments from an error chain."""
    kept: list[str] = []
    for segment in text.split(": "):
        if segment.strip() in _WRAPPERS or segment in kept:
            continue
        kept.append(segment)
    return ": ".join(kept)


def _clean(text: str, *, secrets: Iterable[str]) -> str:
    """Return Trivy's error ``text`` on one line, without wrappers or credentials."""
    text = _MULTI_ERROR.sub("", text).replace("* ", "")
    text = re.sub(r"\s+", " ", text).strip()
    text = _drop_wrappers(text)
    return scrub_credentials(text, secrets=secrets)


def _cap(text: str) -> str:
    if len(text) > MAX_MESSAGE_LENGTH:
        return text[: MAX_MESSAGE_LENGTH - 3].rstrip() + "..."
    return text


def trim_message(text: str, *, secrets: Iterable[str] = ()) -> str:
    """Return Trivy's error ``text`` without wrappers or credentials, at most 1000 characters."""
    return _cap(_clean(text, secrets=secrets))


def _explain(message: str) -> str:
    """Put what is wrong and what to do before Trivy's words, for errors that need it."""
    if _NO_DATABASE.search(message):
        return (
            "Trivy found no vulnerability DB in its cache folder; ask the server's operator "
            "to check the scanner's cache folder (SECAPI_SCANNER__CACHE_DIR when the server "
            "runs scans itself), which must contain db/trivy.db, or to turn off offline mode. "
            f"Trivy reported: {message}"
        )
    artifact = _UNSUPPORTED_ARTIFACT.search(message)
    if artifact is None:
        return message
    artifact_type = artifact.group("type")
    if len(artifact_type) > MAX_ARTIFACT_TYPE_LENGTH:
        artifact_type = artifact_type[:MAX_ARTIFACT_TYPE_LENGTH] + "..."
    return (
        f"the reference points to an OCI artifact of type {artifact_type}, not a container "
        "image; SecAPI scans container images, so submit the reference of one. "
        f"Trivy reported: {message}"
    )


def classify_failure_text(text: str) -> FailureReason:
    """Return the failure reason that ``text`` (Trivy's error) points to."""
    # The DB comes first: a failed DB download also mentions registry and network errors.
    if _DATABASE.search(text):
        return FailureReason.DATABASE_UNAVAILABLE
    if _TIMEOUT.search(text):
        return FailureReason.TIMEOUT
    # With credentials, Trivy also tries anonymously, so a missing image can show
    # both MANIFEST_UNKNOWN and UNAUTHORIZED; the former is the real cause.
    if _NOT_FOUND.search(text):
        return FailureReason.IMAGE_NOT_FOUND
    if _RATE_LIMITED.search(text):
        return FailureReason.RATE_LIMITED
    if _AUTH.search(text):
        return FailureReason.REGISTRY_AUTH_FAILED
    if _UNREACHABLE.search(text):
        return FailureReason.REGISTRY_UNREACHABLE
    return FailureReason.SCANNER_ERROR


def classify_trivy_failure(
    output: str, exit_code: int, *, secrets: Iterable[str] = ()
) -> tuple[FailureReason, str]:
    """Return the reason and message for a Trivy run that exited with ``exit_code``.

    ``output`` is what Trivy printed (stderr, or the end of a pod log). The
    message is never empty: when Trivy printed nothing, it names the
    exit code.
    """
    text = _fatal_text(output)
    message = _cap(_explain(_clean(text, secrets=secrets)))
    if not message:
        message = f"trivy exited with status {exit_code} and printed no error"
    return classify_failure_text(text), message
