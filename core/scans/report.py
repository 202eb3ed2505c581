"""Parse Trivy's JSON report into typed findings.

A report of an image with tens of thousands of findings is tens of MB, and
most of it (descriptions, CVSS vectors, references, code excerpts) is not
kept. msgspec decodes the report against typed structs that name only the
kept fields: it checks their types and skips everything else in C, without
creating Python objects for it. So memory contains the report's bytes and the
kept fields, never the whole document as Python objects, and a 6 MB report
parses in milliseconds. The input's SHA-256 and size are computed too.

Known shape (Trivy v0.74.0, ``SchemaVersion`` 2): a top-level object with
``Trivy.Version``, ``ArtifactName``, ``Metadata`` (``OS`` with ``EOSL``, ``RepoDigests``,
``ImageID``) and ``Results``, a list of targets each with ``Target``,
``Class``, ``Type`` and lists ``Vulnerabilities``, ``Secrets``,
``Misconfigurations`` and ``Licenses``. Invalid JSON or another shape raises ReportError,
which executors record as reason ReportInvalid.

Nothing here knows how the report was produced, so both executors use it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

SUPPORTED_SCHEMA_VERSION = 2
SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")
# Reports at least this large are hashed in a thread while they are decoded.
PARALLEL_HASH_BYTES = 1024 * 1024
# Bytes read at a time from a stream whose size is unknown.
READ_CHUNK_BYTES = 1024 * 1024


class ReportError(Exception):
    """The report is not valid JSON or not shaped like a Trivy report."""


class Vulnerability(msgspec.Struct, frozen=True):
    id: str
    package: str
    installed_version: str
    fixed_version: str | None
    severity: str
    title: str | None
    target: str
    target_class: str | None
    package_type: str | None
    # The file the package was found in (Trivy's PkgPath). For language packages the target
    # names only the ecosystem ("Node.js", "Python"), so this is what tells two copies apart.
    # Trivy gives none for OS packages.
    package_path: str | None
    primary_url: str | None


class Secret(msgspec.Struct, frozen=True):
    rule_id: str
    category: str | None
    severity: str
    title: str | None
    target: str
    start_line: int | None
    end_line: int | None


class Misconfiguration(msgspec.Struct, frozen=True):
    id: str
    title: str | None
    severity: str
    target: str
    target_type: str | None
    message: str | None
    resolution: str | None
    primary_url: str | None


class License(msgspec.Struct, frozen=True):
    """A license Trivy found: of a package (``package`` set) or in a loose license file."""

    name: str
    package: str | None
    severity: str
    category: str | None
    target: str
    target_class: str | None
    # The file Trivy read the license from: the package's metadata file or the license file.
    # Trivy gives none for OS packages.
    package_path: str | None
    confidence: float | None
    link: str | None


@dataclass(frozen=True)
class Summary:
    """Counts of a report. Severity counts and ``total`` are over vulnerabilities only."""

    critical: int
    high: int
    medium: int
    low: int
    unknown: int
    total: int
    secrets: int
    misconfigurations: int
    licenses: int

    def as_dict(self) -> dict[str, int]:
        return {
            "critical": self.critical,
            "high": self.high,
            "medium": self.medium,
            "low": self.low,
            "unknown": self.unknown,
            "total": self.total,
            "secrets": self.secrets,
            "misconfigurations": self.misconfigurations,
            "licenses": self.licenses,
        }


@dataclass
class ParsedReport:
    """The parts of one Trivy report that SecAPI stores."""

    artifact_name: str | None = None
    trivy_version: str | None = None
    image_id: str | None = None
    repo_digests: list[str] = field(default_factory=list)
    os_family: str | None = None
    os_name: str | None = None
    # Whether the OS release is past its end of service life (Trivy's Metadata.OS.EOSL, which
    # Trivy leaves out when false). None when no OS was detected.
    os_eosl: bool | None = None
    vulnerabilities: list[Vulnerability] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)
    misconfigurations: list[Misconfiguration] = field(default_factory=list)
    licenses: list[License] = field(default_factory=list)
    # SHA-256 (hex) and length in bytes of the report as read.
    sha256: str = ""
    size: int = 0

    @property
    def image_digest(self) -> str | None:
        """Return the manifest digest of the scanned image (from RepoDigests), if Trivy knew it."""
        for entry in self.repo_digests:
            _, at, digest = entry.rpartition("@")
            if at and digest:
                return digest
        return None

    @property
    def summary(self) -> Summary:
        counts = dict.fromkeys(SEVERITIES, 0)
        for vulnerability in self.vulnerabilities:
            counts[vulnerability.severity] += 1
        return Summary(
            critical=counts["CRITICAL"],
            high=counts["HIGH"],
            medium=counts["MEDIUM"],
            low=counts["LOW"],
            unknown=counts["UNKNOWN"],
            total=len(self.vulnerabilities),
            secrets=len(self.secrets),
            misconfigurations=len(self.misconfigurations),
            licenses=len(self.licenses),
        )


# -- the decoded shape ---------------------------------------------------------------------
# Structs of the kept fields only, named as Trivy names them. Every field may be
# missing or null; required fields and allowed values are checked after decoding, so
# that the message names the finding.


class _RawVulnerability(msgspec.Struct):
    id: str | None = msgspec.field(default=None, name="VulnerabilityID")
    package: str | None = msgspec.field(default=None, name="PkgName")
    package_path: str | None = msgspec.field(default=None, name="PkgPath")
    installed_version: str | None = msgspec.field(default=None, name="InstalledVersion")
    fixed_version: str | None = msgspec.field(default=None, name="FixedVersion")
    severity: str | None = msgspec.field(default=None, name="Severity")
    title: str | None = msgspec.field(default=None, name="Title")
    primary_url: str | None = msgspec.field(default=None, name="PrimaryURL")


class _RawSecret(msgspec.Struct):
    rule_id: str | None = msgspec.field(default=None, name="RuleID")
    category: str | None = msgspec.field(default=None, name="Category")
    severity: str | None = msgspec.field(default=None, name="Severity")
    title: str | None = msgspec.field(default=None, name="Title")
    start_line: int | None = msgspec.field(default=None, name="StartLine")
    end_line: int | None = msgspec.field(default=None, name="EndLine")


class _RawMisconfiguration(msgspec.Struct):
    id: str | None = msgspec.field(default=None, name="ID")
    avd_id: str | None = msgspec.field(default=None, name="AVDID")
    title: str | None = msgspec.field(default=None, name="Title")
    severity: str | None = msgspec.field(default=None, name="Severity")
    message: str | None = msgspec.field(default=None, name="Message")
    resolution: str | None = msgspec.field(default=None, name="Resolution")
    primary_url: str | None = msgspec.field(default=None, name="PrimaryURL")


class _RawLicense(msgspec.Struct):
    name: str | None = msgspec.field(default=None, name="Name")
    package: str | None = msgspec.field(default=None, name="PkgName")
    severity: str | None = msgspec.field(default=None, name="Severity")
    category: str | None = msgspec.field(default=None, name="Category")
    file_path: str | None = msgspec.field(default=None, name="FilePath")
    confidence: float | None = msgspec.field(default=None, name="Confidence")
    link: str | None = msgspec.field(default=None, name="Link")


class _RawResult(msgspec.Struct):
    target: str | None = msgspec.field(default=None, name="Target")
    target_class: str | None = msgspec.field(default=None, name="Class")
    target_type: str | None = msgspec.field(default=None, name="Type")
    vulnerabilities: list[_RawVulnerability] | None = msgspec.field(
        default=None, name="Vulnerabilities"
    )
    secrets: list[_RawSecret] | None = msgspec.field(default=None, name="Secrets")
    misconfigurations: list[_RawMisconfiguration] | None = msgspec.field(
        default=None, name="Misconfigurations"
    )
    licenses: list[_RawLicense] | None = msgspec.field(default=None, name="Licenses")


class _RawOS(msgspec.Struct):
    family: str | None = msgspec.field(default=None, name="Family")
    name: str | None = msgspec.field(default=None, name="Name")
    eosl: bool | None = msgspec.field(default=None, name="EOSL")


class _RawMetadata(msgspec.Struct):
    os: _RawOS | None = msgspec.field(default=None, name="OS")
    repo_digests: list[str] | None = msgspec.field(default=None, name="RepoDigests")
    image_id: str | None = msgspec.field(default=None, name="ImageID")


class _RawTrivy(msgspec.Struct):
    version: str | None = msgspec.field(default=None, name="Version")


class _RawReport(msgspec.Struct):
    # Any, so that a report of another schema version gets the version message and not a
    # type error about some field that version shapes differently.
    schema_version: Any = msgspec.field(default=None, name="SchemaVersion")
    artifact_name: str | None = msgspec.field(default=None, name="ArtifactName")
    trivy: _RawTrivy | None = msgspec.field(default=None, name="Trivy")
    metadata: _RawMetadata | None = msgspec.field(default=None, name="Metadata")
    results: list[_RawResult] | None = msgspec.field(default=None, name="Results")


class _RawVersion(msgspec.Struct):
    schema_version: Any = msgspec.field(default=None, name="SchemaVersion")


_DECODER = msgspec.json.Decoder(_RawReport)
_VERSION_DECODER = msgspec.json.Decoder(_RawVersion)

# -- messages --------------------------------------------------------------------------------

# msgspec's ValidationError reads "Expected `TYPE`, got `TYPE` - at `$.PATH`".
_VALIDATION_MESSAGE = re.compile(
    r"Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`( - at `\$(?P<path>[^`]*)`)?"
)
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "array": "a list",
    "object": "an object",
    "null": "null",
}


def _type_words(names: str) -> str:
    words = [_TYPE_WORDS.get(name, name) for name in names.split(" | ") if name != "null"]
    return " or ".join(words) or "null"


def _validation_message(error: msgspec.ValidationError) -> str:
    text = str(error)
    match = _VALIDATION_MESSAGE.fullmatch(text)
    if match is None:
        return f"the report has an unexpected shape: {text}"
    path = (match["path"] or "").removeprefix(".")
    if not path:
        return "the report is not a JSON object"
    return f"{path} is {_type_words(match['got'])}, expected {_type_words(match['expected'])}"


# -- conversion ------------------------------------------------------------------------------


def _optional(value: str | None) -> str | None:
    """Return a text field, with Trivy's empty strings as None."""
    return value or None


def _required(value: str | None, name: str, where: str) -> str:
    if not value:
        raise ReportError(f"{where} has no {name}")
    return value


def _severity(value: str | None, where: str) -> str:
    if not value:
        return "UNKNOWN"
    if value not in SEVERITIES:
        raise ReportError(f"{where}: severity {value!r} is not one of {', '.join(SEVERITIES)}")
    return value


def _convert(raw: _RawReport, report: ParsedReport) -> None:
    if raw.trivy is not None:
        report.trivy_version = _optional(raw.trivy.version)
    report.artifact_name = _optional(raw.artifact_name)
    metadata = raw.metadata
    if metadata is not None:
        report.image_id = _optional(metadata.image_id)
        report.repo_digests = list(metadata.repo_digests or ())
        if metadata.os is not None:
            report.os_family = _optional(metadata.os.family)
            report.os_name = _optional(metadata.os.name)
            report.os_eosl = metadata.os.eosl
    if report.os_family is not None and report.os_eosl is None:
        report.os_eosl = False

    for number, result in enumerate(raw.results or ()):
        where = f"Results[{number}]"
        has_findings = (
            result.vulnerabilities or result.secrets or result.misconfigurations or result.licenses
        )
        if has_findings and not result.target:
            raise ReportError(f"{where} has findings but no Target")
        target = result.target or ""
        if result.vulnerabilities:
            _add_vulnerabilities(report, result, target, where)
        for index, secret in enumerate(result.secrets or ()):
            place = f"{where}.Secrets[{index}]"
            report.secrets.append(
                Secret(
                    rule_id=_required(secret.rule_id, "RuleID", place),
                    category=_optional(secret.category),
                    severity=_severity(secret.severity, place),
                    title=_optional(secret.title),
                    target=target,
                    start_line=secret.start_line,
                    end_line=secret.end_line,
                )
            )
        for index, misconfiguration in enumerate(result.misconfigurations or ()):
            place = f"{where}.Misconfigurations[{index}]"
            identifier = misconfiguration.id or misconfiguration.avd_id
            report.misconfigurations.append(
                Misconfiguration(
                    id=_required(identifier, "ID", place),
                    title=_optional(misconfiguration.title),
                    severity=_severity(misconfiguration.severity, place),
                    target=target,
                    target_type=_optional(result.target_type),
                    message=_optional(misconfiguration.message),
                    resolution=_optional(misconfiguration.resolution),
                    primary_url=_optional(misconfiguration.primary_url),
                )
            )
        for index, license_ in enumerate(result.licenses or ()):
            place = f"{where}.Licenses[{index}]"
            report.licenses.append(
                License(
                    name=_required(license_.name, "Name", place),
                    package=_optional(license_.package),
                    severity=_severity(license_.severity, place),
                    category=_optional(license_.category),
                    target=target,
                    target_class=_optional(result.target_class),
                    package_path=_optional(license_.file_path),
                    confidence=license_.confidence,
                    link=_optional(license_.link),
                )
            )


def _add_vulnerabilities(report: ParsedReport, result: _RawResult, target: str, where: str) -> None:
    # The hot loop of a large report: one pass, local names, checks inlined.
    target_class = _optional(result.target_class)
    package_type = _optional(result.target_type)
    severities = frozenset(SEVERITIES)
    append = report.vulnerabilities.append
    for index, item in enumerate(result.vulnerabilities or ()):
        severity = item.severity or "UNKNOWN"
        if not item.id or not item.package or severity not in severities:
            place = f"{where}.Vulnerabilities[{index}]"
            _required(item.id, "VulnerabilityID", place)
            _required(item.package, "PkgName", place)
            _severity(severity, place)
        append(
            Vulnerability(
                id=item.id or "",
                package=item.package or "",
                installed_version=item.installed_version or "",
                fixed_version=item.fixed_version or None,
                severity=severity,
                title=item.title or None,
                target=target,
                target_class=target_class,
                package_type=package_type,
                package_path=item.package_path or None,
                primary_url=item.primary_url or None,
            )
        )


def _decode(data: bytes) -> _RawReport:
    # isspace() stops at the first other byte, where strip() would copy a report of megabytes.
    if not data or data.isspace():
        raise ReportError("the report is empty")
    try:
        return _DECODER.decode(data)
    except msgspec.ValidationError as error:
        # A report of another schema version may be shaped otherwise: name the version first.
        try:
            version = _VERSION_DECODER.decode(data).schema_version
        except msgspec.MsgspecError:
            version = SUPPORTED_SCHEMA_VERSION
        if version != SUPPORTED_SCHEMA_VERSION:
            raise _schema_error(version) from error
        raise ReportError(_validation_message(error)) from error
    except msgspec.DecodeError as error:
        raise ReportError(f"the report is not valid JSON: {error}") from error


def _schema_error(version: object) -> ReportError:
    return ReportError(
        f"the report's SchemaVersion is {version!r}; "
        f"only Trivy JSON reports of schema {SUPPORTED_SCHEMA_VERSION} are supported"
    )


def parse_report_bytes(data: bytes, *, max_bytes: int | None = None) -> ParsedReport:
    """Parse a Trivy JSON report held in memory; raise ReportError for anything else."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ReportError(f"the report is larger than the maximum of {max_bytes} bytes")
    digest = hashlib.sha256()
    # hashlib releases the GIL for large inputs, so a large report is hashed in a thread
    # while msgspec decodes it. For a 6 MB report that took 6 ms instead of 10 ms on an
    # idle 2-core machine, and gained nothing when the other core was busy.
    hashing = None
    if len(data) >= PARALLEL_HASH_BYTES:
        hashing = threading.Thread(target=digest.update, args=(data,), name="report-sha256")
        hashing.start()
    else:
        digest.update(data)
    try:
        raw = _decode(data)
    finally:
        if hashing is not None:
            hashing.join()
    if raw.schema_version != SUPPORTED_SCHEMA_VERSION or isinstance(raw.schema_version, bool):
        raise _schema_error(raw.schema_version)
    report = ParsedReport()
    _convert(raw, report)
    report.sha256 = digest.hexdigest()
    report.size = len(data)
    return report


def _read_limited(source: IO[bytes], max_bytes: int | None) -> bytes:
    if max_bytes is None:
        return source.read()
    too_large = ReportError(f"the report is larger than the maximum of {max_bytes} bytes")
    try:
        size = os.fstat(source.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        size = None
    if size is not None and size > max_bytes:
        raise too_large
    # read(n) allocates n bytes first: reading up to a limit of hundreds of megabytes took
    # 2.9 ms for a 6 MB report where reading to the end took 0.5 ms. So a file whose size
    # is known is read to its end, and other streams in chunks.
    if size is not None:
        data = source.read()
    else:
        chunks = []
        total = 0
        while chunk := source.read(READ_CHUNK_BYTES):
            total += len(chunk)
            if total > max_bytes:
                raise too_large
            chunks.append(chunk)
        data = b"".join(chunks)
    if len(data) > max_bytes:
        raise too_large
    return data


def parse_report(source: bytes | Path | IO[bytes], *, max_bytes: int | None = None) -> ParsedReport:
    """Parse a Trivy JSON report given as bytes, a file path or a binary stream.

    Raises ReportError when it is not valid JSON, not a Trivy report of schema
    version 2, or (with ``max_bytes``) larger than ``max_bytes``. The whole report
    is read into memory; ``max_bytes`` bounds that.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return parse_report_bytes(bytes(source), max_bytes=max_bytes)
    if isinstance(source, Path):
        with source.open("rb") as stream:
            return parse_report_bytes(_read_limited(stream, max_bytes), max_bytes=max_bytes)
    return parse_report_bytes(_read_limited(source, max_bytes), max_bytes=max_bytes)
