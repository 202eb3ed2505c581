"""The image reference grammar: what is accepted, how it is normalised, what is rejected."""

from __future__ import annotations

import pytest

from secapi.core.errors import InvalidInputError
from secapi.core.scans.reference import MAX_NAME_LENGTH, check_scannable, parse_reference

SHA256 = "sha256:" + "a" * 64
SHA512 = "sha512:" + "0123456789abcdef" * 8

# (reference, canonical form)
VALID = [
    ("nginx", "docker.io/library/nginx:latest"),
    ("nginx:1.27", "docker.io/library/nginx:1.27"),
    ("nginx:latest", "docker.io/library/nginx:latest"),
    ("library/nginx:1.27", "docker.io/library/nginx:1.27"),
    ("docker.io/nginx", "docker.io/library/nginx:latest"),
    ("docker.io/library/nginx", "docker.io/library/nginx:latest"),
    ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
    ("bitnami/redis:7.2", "docker.io/bitnami/redis:7.2"),
    ("ghcr.io/owner/app:v1.2.3", "ghcr.io/owner/app:v1.2.3"),
    ("registry.example.com/team/sub/app:1", "registry.example.com/team/sub/app:1"),
    ("registry.example.com:8443/app", "registry.example.com:8443/app:latest"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/x", "localhost:5000/x:latest"),
    ("localhost:5000/x:tag", "localhost:5000/x:tag"),
    ("127.0.0.1:5000/fixtures/alpine:3.17", "127.0.0.1:5000/fixtures/alpine:3.17"),
    ("[::1]:5000/app:1", "[::1]:5000/app:1"),
    ("[2001:db8::1]/app", "[2001:db8::1]/app:latest"),
    (f"nginx@{SHA256}", f"docker.io/library/nginx@{SHA256}"),
    (f"host:5000/x@{SHA256}", f"host:5000/x@{SHA256}"),
    (f"nginx:1.27@{SHA256}", f"docker.io/library/nginx:1.27@{SHA256}"),
    (f"example.com/app@{SHA512}", f"example.com/app@{SHA512}"),
    ("my-registry.example.com/a-b/c_d/e.f/g__h:x", "my-registry.example.com/a-b/c_d/e.f/g__h:x"),
    ("a/b---c:tag", "docker.io/a/b---c:tag"),
    ("app:_underscore.start", "docker.io/library/app:_underscore.start"),
    ("app:UPPER-case_Tag.1", "docker.io/library/app:UPPER-case_Tag.1"),
    ("app:" + "t" * 128, "docker.io/library/app:" + "t" * 128),
    ("Registry.Example.COM/app", "Registry.Example.COM/app:latest"),
    ("x" * MAX_NAME_LENGTH, "docker.io/library/" + "x" * MAX_NAME_LENGTH + ":latest"),
]

# (reference, a text the error message must contain)
INVALID = [
    ("", "empty"),
    ("Library/Nginx", "repository name must be lowercase: 'Library/Nginx'"),
    ("NGINX", "must be lowercase"),
    ("ghcr.io/Owner/app", "must be lowercase: 'Owner/app'"),
    ("-nginx", "must not start with '-'"),
    ("--help", "must not start with '-'"),
    (" nginx", "whitespace"),
    ("nginx ", "whitespace"),
    ("nginx:1.0 --debug", "whitespace"),
    ("ngi\tnx", "whitespace"),
    ("nginx\n", "whitespace"),
    ("nginx\nrm -rf /", "whitespace"),
    ("nginx\x00", "control"),
    ("nginx\x1b[31m", "control"),
    ("nginx;id", "';'"),
    ("nginx$(id)", "'$'"),
    ("nginx`id`", "'`'"),
    ("nginx|cat", "'|'"),
    ("nginx&&id", "'&'"),
    ("nginx>out", "'>'"),
    ("nginx'", '"\'"'),
    ('nginx"', "'\"'"),
    ("nginx*", "'*'"),
    ("ngïnx", "'ï'"),
    ("nginx:", "tag ''"),
    ("nginx:-tag", "tag '-tag'"),
    ("nginx:.tag", "tag '.tag'"),
    ("nginx:" + "t" * 129, "tag"),
    ("nginx@sha256:abc", "64 lowercase hex"),
    ("nginx@sha256:" + "A" * 64, "64 lowercase hex"),
    ("nginx@sha256:" + "g" * 64, "64 lowercase hex"),
    ("nginx@sha512:" + "a" * 64, "128 lowercase hex"),
    ("nginx@md5:" + "a" * 32, "not supported"),
    ("nginx@" + "a" * 64, "algorithm:hex"),
    ("nginx@", "algorithm:hex"),
    (f"nginx@{SHA256}@{SHA256}", "more than one '@'"),
    (f"@{SHA256}", "repository name is missing"),
    (":tag", "repository name is missing"),
    ("nginx/", "empty path component"),
    ("/nginx", "empty path component"),
    ("a//b", "empty path component"),
    ("a/-b", "path component '-b'"),
    ("a/b_", "path component 'b_'"),
    ("a/b___c", "path component 'b___c'"),
    ("a/b..c", "path component 'b..c'"),
    ("localhost:0/x", "port '0'"),
    ("localhost:99999/x", "port '99999'"),
    ("localhost:/x", "port ''"),
    ("-host.example.com/x", "must not start with '-'"),
    ("host-.example.com/x", "registry host 'host-.example.com'"),
    ("exa_mple.com/x", "registry host 'exa_mple.com'"),
    ("[::1/x", "'[' without ']'"),
    ("[not-ipv6]:5000/x", "not a valid IPv6 address"),
    ("[::1]x/app", "registry host"),
    ("x" * (MAX_NAME_LENGTH + 1), "more than the maximum of 255"),
    ("example.com/" + "a" * 300 + ":1", "more than the maximum of 255"),
    ("a/" * 300 + "b", "more than the maximum of 512"),
]


@pytest.mark.parametrize(("reference", "canonical"), VALID)
def test_valid_reference_is_canonicalised(reference: str, canonical: str) -> None:
    parsed = parse_reference(reference)

    assert parsed.original == reference
    assert parsed.canonical == canonical


@pytest.mark.parametrize(("reference", "expected"), INVALID)
def test_invalid_reference_is_rejected(reference: str, expected: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        parse_reference(reference)

    error = raised.value
    assert expected in error.message
    assert error.field == "image"
    assert error.value == reference


def test_table_has_forty_cases_or_more() -> None:
    assert len(VALID) + len(INVALID) >= 40


def test_error_names_value() -> None:
    with pytest.raises(InvalidInputError) as raised:
        parse_reference("UPPER/Case:tag with space")

    assert "UPPER/Case:tag with space" in raised.value.message


def test_reference_parts() -> None:
    parsed = parse_reference(f"127.0.0.1:5000/team/app:1.0@{SHA256}")

    assert parsed.domain == "127.0.0.1:5000"
    assert parsed.registry == "127.0.0.1:5000"
    assert parsed.path == "team/app"
    assert parsed.repository == "127.0.0.1:5000/team/app"
    assert parsed.tag == "1.0"
    assert parsed.digest == SHA256


def test_short_name_is_on_docker_hub() -> None:
    parsed = parse_reference("alpine:3.20")

    assert parsed.domain is None
    assert parsed.registry == "docker.io"
    assert parsed.repository == "docker.io/library/alpine"
    # Trivy gets the reference exactly as written, not the canonical form.
    assert parsed.original == "alpine:3.20"


@pytest.mark.parametrize(
    ("reference", "without_scheme"),
    [
        ("http://127.0.0.1:5000/x:1", "127.0.0.1:5000/x:1"),
        ("https://docker.io/library/nginx", "docker.io/library/nginx"),
        ("HTTPS://ghcr.io/owner/app:1", "ghcr.io/owner/app:1"),
        ("oci://registry.example.com/app", "registry.example.com/app"),
    ],
)
def test_url_scheme_is_rejected(reference: str, without_scheme: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        parse_reference(reference)

    message = raised.value.message
    assert "no URL scheme" in message
    assert f"write {without_scheme!r}" in message
    assert "port" not in message
    assert raised.value.field == "image"
    assert raised.value.value == reference


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("localhost:5000/x", "shorter than 2 characters"),
        ("x", "shorter than 2 characters"),
        (f"example.com/app@{SHA512}", "sha256 digest only"),
    ],
)
def test_valid_but_not_scannable(reference: str, expected: str) -> None:
    parsed = parse_reference(reference)

    with pytest.raises(InvalidInputError) as raised:
        check_scannable(parsed)
    assert expected in raised.value.message
    assert raised.value.value == reference


@pytest.mark.parametrize("reference", ["nginx", "ab", "localhost:5000/xy", f"nginx:1@{SHA256}"])
def test_scannable(reference: str) -> None:
    check_scannable(parse_reference(reference))
