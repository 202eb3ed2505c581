"""Parse Trivy's JSON report into typed findings, reading it as a stream.

A report of an image with tens of thousands of findings is tens of MB, and
most of it (descriptions, CVSS vectors, references, code excerpts) is not
kept. The parser walks ijson's event stream and keeps only the fields it
stores, one finding at a time. So memory contains the typed findings and
never the whole document as Python objects. The input's SHA-256 and size are computed
in the same pass.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import ijson

SUPPORTED_SCHEMA_VERSION = 2
SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")
READ_CHUNK_BYTES = 64 * 1024


class ReportError(Exception):
    """The report is not valid JSON or not shaped like a Trivy report."""


@dataclass(frozen=True, slots=True)
class Vulnerability:
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


@dataclass(frozen=True, slots=True)
class Secret:
    rule_id: str
    category: str | None
    severity: str
    title: str | None
    target: str
    start_line: int | None
    end_line: int | None


@dataclass(frozen=True, slots=True)
class Misconfiguration:
    id: str
    title: str | None
    severity: str
    target: str
    target_type: str | None
    message: str | None
    resolution: str | None
    primary_url: str | None


@dataclass(frozen=True, slots=True)
class License:
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


class _HashingReader(io.RawIOBase):
    """A binary reader that hashes and counts what passes through it."""

    def __init__(self, source: IO[bytes], *, max_bytes: int | None) -> None:
        self._source = source
        self._max_bytes = max_bytes
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        # ijson calls read(0) to learn whether the stream returns bytes or text.
        if size == 0:
            return b""
        data = self._source.read(size if size is not None and size > 0 else READ_CHUNK_BYTES)
        self.size += len(data)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise ReportError(f"the report is larger than the maximum of {self._max_bytes} bytes")
        self.digest.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _text(item: dict[str, Any], key: str, *, where: str, required: bool = False) -> str | None:
    value = item.get(key)
    if value is None or value == "":
        if required:
            raise ReportError(f"{where} has no {key}")
        return None
    if not isinstance(value, str):
        raise ReportError(f"{where}: {key} is {type(value).__name__}, expected a string")
    return value


def _line(item: dict[str, Any], key: str, *, where: str) -> int | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReportError(f"{where}: {key} is {type(value).__name__}, expected an integer")
    return value


def _number(item: dict[str, Any], key: str, *, where: str) -> float | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"{where}: {key} is {type(value).__name__}, expected a number")
    return float(value)


def _severity(item: dict[str, Any], *, where: str) -> str:
    value = _text(item, "Severity", where=where) or "UNKNOWN"
    if value not in SEVERITIES:
        raise ReportError(f"{where}: severity {value!r} is not one of {', '.join(SEVERITIES)}")
    return value


# Prefixes (in ijson's dotted notation) of the four finding lists and of
# their items, and the item fields that are kept. Every other event, such as
# the CVSS vectors and references nested in a finding, is skipped by one
# dictionary lookup, which is what keeps parsing fast.
_RESULT = "Results.item"
_FINDING_LISTS = ("Vulnerabilities", "Secrets", "Misconfigurations", "Licenses")
_LISTS = {f"{_RESULT}.{name}": name for name in _FINDING_LISTS}
_ITEMS = {f"{prefix}.item": name for prefix, name in _LISTS.items()}
_KEPT_FIELDS = {
    "Vulnerabilities": (
        "VulnerabilityID",
        "PkgName",
        "PkgPath",
        "InstalledVersion",
        "FixedVersion",
        "Severity",
        "Title",
        "PrimaryURL",
    ),
    "Secrets": ("RuleID", "Category", "Severity", "Title", "StartLine", "EndLine"),
    "Misconfigurations": (
        "ID",
        "AVDID",
        "Title",
        "Severity",
        "Message",
        "Resolution",
        "PrimaryURL",
    ),
    "Licenses": ("Name", "PkgName", "Severity", "Category", "FilePath", "Confidence", "Link"),
}
_FIELDS = {
    f"{item_prefix}.{field_name}": field_name
    for item_prefix, list_name in _ITEMS.items()
    for field_name in _KEPT_FIELDS[list_name]
}
_TARGET_FIELDS = {f"{_RESULT}.{name}": name for name in ("Target", "Class", "Type")}
_METADATA = {
    "ArtifactName": "artifact_name",
    "Trivy.Version": "trivy_version",
    "Metadata.ImageID": "image_id",
    "Metadata.OS.Family": "os_family",
    "Metadata.OS.Name": "os_name",
}
_SCALAR_EVENTS = frozenset({"string", "number", "boolean", "null", "integer", "double"})


@dataclass
class _Target:
    """The fields of one entry of ``Results`` that its findings need."""

    target: str | None = None
    target_class: str | None = None
    target_type: str | None = None
    fields_seen: set[str] = field(default_factory=set)
    # Findings read before all three fields were seen: (list name, index, fields).
    waiting: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.fields_seen) == 3


def _vulnerability(item: dict[str, Any], target: _Target, where: str) -> Vulnerability:
    return Vulnerability(
        id=_text(item, "VulnerabilityID", where=where, required=True) or "",
        package=_text(item, "PkgName", where=where, required=True) or "",
        installed_version=_text(item, "InstalledVersion", where=where) or "",
        fixed_version=_text(item, "FixedVersion", where=where),
        severity=_severity(item, where=where),
        title=_text(item, "Title", where=where),
        target=target.target or "",
        target_class=target.target_class,
        package_type=target.target_type,
        package_path=_text(item, "PkgPath", where=where),
        primary_url=_text(item, "PrimaryURL", where=where),
    )


def _secret(item: dict[str, Any], target: _Target, where: str) -> Secret:
    return Secret(
        rule_id=_text(item, "RuleID", where=where, required=True) or "",
        category=_text(item, "Category", where=where),
        severity=_severity(item, where=where),
        title=_text(item, "Title", where=where),
        target=target.target or "",
        start_line=_line(item, "StartLine", where=where),
        end_line=_line(item, "EndLine", where=where),
    )


def _misconfiguration(item: dict[str, Any], target: _Target, where: str) -> Misconfiguration:
    identifier = _text(item, "ID", where=where) or _text(item, "AVDID", where=where)
    if identifier is None:
        raise ReportError(f"{where} has no ID")
    return Misconfiguration(
        id=identifier,
        title=_text(item, "Title", where=where),
        severity=_severity(item, where=where),
        target=target.target or "",
        target_type=target.target_type,
        message=_text(item, "Message", where=where),
        resolution=_text(item, "Resolution", where=where),
        primary_url=_text(item, "PrimaryURL", where=where),
    )


def _license(item: dict[str, Any], target: _Target, where: str) -> License:
    return License(
        name=_text(item, "Name", where=where, required=True) or "",
        package=_text(item, "PkgName", where=where),
        severity=_severity(item, where=where),
        category=_text(item, "Category", where=where),
        target=target.target or "",
        target_class=target.target_class,
        package_path=_text(item, "FilePath", where=where),
        confidence=_number(item, "Confidence", where=where),
        link=_text(item, "Link", where=where),
    )


class _Parser:
    """Consumes ijson events and fills a ParsedReport."""

    def __init__(self) -> None:
        self.report = ParsedReport()
        self.schema_version: object = None
        self._target: _Target | None = None
        self._target_index = -1
        # The finding being read: its list name, index in that list, and kept fields.
        self._item: dict[str, Any] | None = None
        self._item_list = ""
        self._counts = dict.fromkeys(_LISTS.values(), 0)

    def _where(self, list_name: str, index: int) -> str:
        return f"Results[{self._target_index}].{list_name}[{index}]"

    def _add(self, list_name: str, index: int, item: dict[str, Any]) -> None:
        target = self._target
        assert target is not None
        where = self._where(list_name, index)
        if list_name == "Vulnerabilities":
            self.report.vulnerabilities.append(_vulnerability(item, target, where))
        elif list_name == "Secrets":
            self.report.secrets.append(_secret(item, target, where))
        elif list_name == "Licenses":
            self.report.licenses.append(_license(item, target, where))
        else:
            self.report.misconfigurations.append(_misconfiguration(item, target, where))

    def event(self, prefix: str, event: str, value: Any) -> None:
        # Ordered by how often each case occurs in a large report.
        item = self._item
        if item is not None:
            name = _FIELDS.get(prefix)
            if name is not None:
                if event not in _SCALAR_EVENTS:
                    raise ReportError(
                        f"{self._where(self._item_list, self._counts[self._item_list] - 1)}: "
                        f"{name} is not a string or number"
                    )
                item[name] = value
            elif event == "end_map" and prefix in _ITEMS:
                self._end_item()
            return
        if event == "map_key":
            return

        if prefix in _ITEMS:
            if event != "start_map":
                raise ReportError(
                    f"Results[{self._target_index}].{_ITEMS[prefix]} contains an item that is not an object"
                )
            self._item = {}
            self._item_list = _ITEMS[prefix]
            self._counts[self._item_list] += 1
        elif prefix in _LISTS:
            if event not in ("start_array", "end_array", "null"):
                raise ReportError(f"Results[{self._target_index}].{_LISTS[prefix]} is not a list")
        elif prefix in _TARGET_FIELDS:
            self._target_field(_TARGET_FIELDS[prefix], event, value)
        elif prefix == _RESULT:
            self._result_event(event)
        elif prefix in _METADATA:
            if event == "string":
                setattr(self.report, _METADATA[prefix], value)
        elif prefix == "Metadata.OS.EOSL":
            if event != "boolean":
                raise ReportError("Metadata.OS.EOSL is not a boolean")
            self.report.os_eosl = value
        elif prefix == "Metadata.RepoDigests.item":
            if event == "string":
                self.report.repo_digests.append(value)
        elif prefix == "SchemaVersion":
            self.schema_version = value
        elif prefix == "Results":
            if event not in ("start_array", "end_array", "null"):
                raise ReportError("Results is not a list")
        elif prefix == "" and event not in ("start_map", "end_map"):
            raise ReportError("the report is not a JSON object")

    def _end_item(self) -> None:
        item, list_name = self._item, self._item_list
        assert item is not None and self._target is not None
        self._item = None
        index = self._counts[list_name] - 1
        # Trivy writes Target, Class and Type before the lists, so a finding is
        # converted at once. In another order it waits for the end of its target.
        if self._target.complete:
            self._add(list_name, index, item)
        else:
            self._target.waiting.append((list_name, index, item))

    def _result_event(self, event: str) -> None:
        if event == "start_map":
            self._target_index += 1
            self._target = _Target()
        elif event == "end_map":
            target = self._target
            assert target is not None
            if target.waiting and target.target is None:
                raise ReportError(f"Results[{self._target_index}] has findings but no Target")
            for list_name, index, item in target.waiting:
                self._add(list_name, index, item)
            self._target = None
        else:
            raise ReportError(f"Results[{self._target_index + 1}] is not an object")

    def _target_field(self, name: str, event: str, value: Any) -> None:
        target = self._target
        assert target is not None
        if event != "string":
            raise ReportError(f"Results[{self._target_index}].{name} is not a string")
        target.fields_seen.add(name)
        if name == "Target":
            target.target = value
        elif name == "Class":
            target.target_class = value
        else:
            target.target_type = value


def _events(reader: _HashingReader) -> Iterator[tuple[str, str, Any]]:
    try:
        yield from ijson.parse(reader, use_float=True)
    except (ijson.JSONError, UnicodeDecodeError) as error:
        if reader.size == 0:
            raise ReportError("the report is empty") from error
        # ijson's message continues with an excerpt of the input, so keep only its first line.
        first_line = (str(error).strip().splitlines() or ["unknown error"])[0]
        raise ReportError(f"the report is not valid JSON: {first_line}") from error


def parse_report_stream(source: IO[bytes], *, max_bytes: int | None = None) -> ParsedReport:
    """Parse a Trivy JSON report from a binary stream; raise ReportError for anything else."""
    reader = _HashingReader(source, max_bytes=max_bytes)
    parser = _Parser()
    for prefix, event, value in _events(reader):
        parser.event(prefix, event, value)
    # Drain what ijson did not need, so the hash covers every byte.
    while reader.read(READ_CHUNK_BYTES):
        pass

    if parser.schema_version != SUPPORTED_SCHEMA_VERSION:
        raise ReportError(
            f"the report's SchemaVersion is {parser.schema_version!r}; "
            f"only Trivy JSON reports of schema {SUPPORTED_SCHEMA_VERSION} are supported"
        )
    report = parser.report
    if report.os_family is not None and report.os_eosl is None:
        report.os_eosl = False
    report.sha256 = reader.digest.hexdigest()
    report.size = reader.size
    return report


def parse_report(source: bytes | Path | IO[bytes], *, max_bytes: int | None = None) -> ParsedReport:
    """Parse a Trivy JSON report given as bytes, a file path or a binary stream.

    Raises ReportError when it is not valid JSON, not a Trivy report of schema
    version 2, or (with ``max_bytes``) larger than ``max_bytes``.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return parse_report_stream(io.BytesIO(source), max_bytes=max_bytes)
    if isinstance(source, Path):
        with source.open("rb") as stream:
            return parse_report_stream(stream, max_bytes=max_bytes)
    return parse_report_stream(source, max_bytes=max_bytes)
