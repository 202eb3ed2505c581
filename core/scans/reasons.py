"""Failure reasons: the stable, machine-readable word for how a scan failed.

Both executors store one of these in ``scans.reason`` (and the operator in the
Scan's ``status.reason``). Clients branch on them, so the values are a
contract: add new ones, never rename.
"""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    IMAGE_NOT_FOUND = "ImageNotFound"
    REGISTRY_AUTH_FAILED = "RegistryAuthFailed"
    REGISTRY_UNREACHABLE = "RegistryUnreachable"
    RATE_LIMITED = "RateLimited"
    TIMEOUT = "Timeout"
    OOM_KILLED = "OOMKilled"
    REPORT_TRUNCATED = "ReportTruncated"
    REPORT_INVALID = "ReportInvalid"
    REPORT_TOO_LARGE = "ReportTooLarge"
    SCANNER_IMAGE_PULL_FAILED = "ScannerImagePullFailed"
    UNSCHEDULABLE = "Unschedulable"
    JOB_DELETED = "JobDeleted"
    SCANNER_ERROR = "ScannerError"
    DATABASE_UNAVAILABLE = "DatabaseUnavailable"
    QUEUE_TIMEOUT = "QueueTimeout"
    EXECUTOR_UNAVAILABLE = "ExecutorUnavailable"
    INTERRUPTED = "Interrupted"
    # A Scan resource applied with kubectl whose spec the CRD schema let through
    # but the scan domain rejects (an image reference outside the grammar, say).
    INVALID_INPUT = "InvalidInput"
