"""The mapping between a Scan resource's spec and the API's scan options."""

from __future__ import annotations

import pytest

from secapi.core.errors import InvalidInputError
from secapi.core.executors.scan_resource import format_duration, parse_duration
from secapi.core.executors.scan_spec import options_from_spec, spec_from_options
from secapi.core.scans.options import ScanOptions
from secapi.core.settings import ScannerSettings, Settings


def make_settings(max_timeout: int = 3600) -> Settings:
    return Settings(scanner=ScannerSettings(max_timeout_seconds=max_timeout))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("2h", 7200), ("1h0m5s", 3605)],
)
def test_duration_parses(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "1d", "10 m", "-5s", "5s10m"])
def test_duration_rejects_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [10, 59, 60, 61, 3600, 5400, 86400])
def test_duration_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_spec_round_trips_options() -> None:
    options = ScanOptions(
        scanners=["vuln", "misconfig"],
        severities=["CRITICAL"],
        ignore_unfixed=True,
        timeout_seconds=900,
        platform="linux/arm64/v8",
    )
    spec = spec_from_options(image="127.0.0.1:5000/app:1", options=options)
    image, parsed = options_from_spec(spec, make_settings())

    assert spec["timeout"] == "15m"
    assert image == "127.0.0.1:5000/app:1"
    assert parsed == options


def test_spec_defaults_match_options_defaults() -> None:
    image, options = options_from_spec({"image": "alpine:3.19"}, make_settings())

    assert image == "alpine:3.19"
    assert options == ScanOptions()


def test_timeout_above_maximum_is_lowered() -> None:
    _, options = options_from_spec({"image": "alpine:3.19", "timeout": "2h"}, make_settings(600))
    assert options.timeout_seconds == 600


def test_invalid_reference_names_spec_image() -> None:
    with pytest.raises(InvalidInputError) as caught:
        options_from_spec({"image": "UPPER/Case:tag"}, make_settings())
    assert caught.value.field == "spec.image"


def test_invalid_platform_names_field() -> None:
    with pytest.raises(InvalidInputError) as caught:
        options_from_spec({"image": "alpine:3.19", "platform": "Linux"}, make_settings())
    assert caught.value.field == "spec.platform"


def test_unpullable_reference_is_invalid() -> None:
    # Valid grammar, but Trivy's registry client cannot pull a one-character repository.
    with pytest.raises(InvalidInputError) as caught:
        options_from_spec({"image": "127.0.0.1:5000/a:1"}, make_settings())
    assert caught.value.field == "spec.image"
