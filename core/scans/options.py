"""How one scan runs: the request fields besides the image.

The API accepts them in the request body, the operator reads them from a Scan
resource's spec, and both store them in ``scans.options`` as JSON.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Scanner = Literal["vuln", "secret", "misconfig", "license"]
Severity = Literal["UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL"]

ALL_SEVERITIES: tuple[Severity, ...] = ("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
DEFAULT_SCANNERS: tuple[Scanner, ...] = ("vuln", "secret")

# os/arch[/variant] as Trivy's --platform flag takes it, e.g. linux/arm64/v8.
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9.]+)?")


class ScanOptions(BaseModel):
    model_config = ConfigDict(frozen=True)

    scanners: list[Scanner] = Field(
        default_factory=lambda: list(DEFAULT_SCANNERS),
        min_length=1,
        description="What Trivy looks for: vuln, secret, misconfig, license.",
    )
    severities: list[Severity] = Field(
        default_factory=lambda: list(ALL_SEVERITIES),
        min_length=1,
        description="Severities of findings to report.",
    )
    ignore_unfixed: bool = Field(
        False, description="Leave out vulnerabilities that have no fixed version yet."
    )
    # No upper bound here: the one ceiling is the server's scanner.max_timeout_seconds,
    # which ScanService.submit enforces and the operator applies.
    timeout_seconds: int | None = Field(
        None,
        ge=10,
        description="Time limit of the scan in seconds; unset means the server's default. "
        "At most the server's SECAPI_SCANNER__MAX_TIMEOUT_SECONDS (3600 by default).",
    )
    platform: str | None = Field(
        None,
        max_length=64,
        description="Platform of a multi-platform image as os/arch[/variant], e.g. linux/arm64.",
    )

    @field_validator("severities", mode="before")
    @classmethod
    def _upper_case_severities(cls, values: Any) -> Any:
        # The query parameter `severity` takes any case, so the body does too.
        if isinstance(values, list):
            return [value.upper() if isinstance(value, str) else value for value in values]
        return values

    @field_validator("scanners", "severities")
    @classmethod
    def _drop_repeats(cls, values: list[str]) -> list[str]:
        return list(dict.fromkeys(values))

    @field_validator("platform")
    @classmethod
    def _check_platform(cls, value: str | None) -> str | None:
        if value is not None and not _PLATFORM.fullmatch(value):
            raise ValueError(
                f"platform {value!r} is invalid: write os/arch or os/arch/variant in lowercase, "
                "e.g. linux/amd64 or linux/arm64/v8"
            )
        return value
