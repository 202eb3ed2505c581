"""Translate between a Scan resource's spec and the scan options of the REST API.

The API writes specs from `ScanOptions` and the operator reads them back, so
a scan submitted through the API and one applied with kubectl run with the
same Trivy flags.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from secapi.core.errors import InvalidInputError
from secapi.core.executors.scan_resource import format_duration, parse_duration
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.reference import check_scannable, parse_reference
from secapi.core.settings import Settings


def spec_from_options(*, image: str, options: ScanOptions) -> dict[str, Any]:
    """Return the spec of a Scan resource for an image and the API's scan options."""
    spec: dict[str, Any] = {
        "image": image,
        "scanners": list(options.scanners),
        "severities": list(options.severities),
        "ignoreUnfixed": options.ignore_unfixed,
    }
    if options.timeout_seconds is not None:
        spec["timeout"] = format_duration(options.timeout_seconds)
    if options.platform:
        spec["platform"] = options.platform
    return spec


def options_from_spec(spec: dict[str, Any], settings: Settings) -> tuple[str, ScanOptions]:
    """Return the image and scan options that a Scan resource's spec requests.

    A timeout above the configured maximum is lowered to it. Raises
    InvalidInputError naming the spec field for anything the CRD's schema
    could not check, such as the image reference's grammar.
    """
    image = str(spec.get("image") or "")
    try:
        check_scannable(parse_reference(image))
    except InvalidInputError as error:
        raise InvalidInputError(error.message, field="spec.image", value=image) from error

    timeout_seconds = None
    if spec.get("timeout"):
        try:
            timeout_seconds = parse_duration(str(spec["timeout"]))
        except ValueError as error:
            raise InvalidInputError(
                str(error), field="spec.timeout", value=str(spec["timeout"])
            ) from error
        timeout_seconds = min(timeout_seconds, settings.scanner.max_timeout_seconds)

    values: dict[str, Any] = {
        "ignore_unfixed": bool(spec.get("ignoreUnfixed", False)),
        "timeout_seconds": timeout_seconds,
        "platform": spec.get("platform") or None,
    }
    if spec.get("scanners"):
        values["scanners"] = list(spec["scanners"])
    if spec.get("severities"):
        values["severities"] = list(spec["severities"])
    try:
        options = ScanOptions.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ()))
        raise InvalidInputError(
            f"invalid Scan spec field {location or 'spec'}: {first.get('msg')}",
            field=f"spec.{location}" if location else "spec",
        ) from error
    return image, options
