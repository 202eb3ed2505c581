"""Parse and validate container image references before anything is queued.

The grammar is the one of the Docker/OCI distribution reference:

    reference  := name [":" tag] ["@" digest]
    name       := [domain "/"] path
    domain     := host [":" port]
    host       := domain-name | IPv4 address | "[" IPv6 address "]"
    path       := component ("/" component)*, each lowercase [a-z0-9]+ joined by
                  ".", "_", "__" or one or more "-"
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := algorithm ":" hex

A reference that passes reaches Trivy as one argument after ``--``, never
through a shell. So the checks here give the user a precise error early, and
they are not what keeps a reference from being run as a command. The allowed
characters are a small fixed set, which also rejects every shell
metacharacter, whitespace and control character.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from secapi.core.errors import InvalidInputError

FIELD = "image"

# Maximum length of the name (domain and path, without tag and digest), as in the distribution library.
MAX_NAME_LENGTH = 255
# Maximum length of the whole reference, because the scans table stores at most 512 characters.
MAX_REFERENCE_LENGTH = 512

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPOSITORY_PREFIX = "library/"
DEFAULT_TAG = "latest"

# Hex digits of the digest algorithms that registries and Trivy accept.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}

_ALLOWED_CHARACTER = re.compile(r"[A-Za-z0-9._:/@\-\[\]]")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_ALGORITHM = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
_LOWERCASE_HEX = re.compile(r"[a-f0-9]+")
# A URL scheme as in RFC 3986, e.g. the `https://` of a reference copied from a browser.
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ImageReference:
    """A validated image reference, as written and in canonical form."""

    # The reference exactly as the user wrote it; this is what Trivy receives.
    original: str
    # Registry host and port as written, or None when the reference names none.
    domain: str | None
    # Repository path as written, without the domain.
    path: str
    tag: str | None
    digest: str | None

    @property
    def registry(self) -> str:
        """Return the registry that serves the image, Docker Hub when none is written."""
        if self.domain is None or self.domain == LEGACY_DEFAULT_DOMAIN:
            return DEFAULT_DOMAIN
        return self.domain

    @property
    def repository(self) -> str:
        """Return the full repository name, e.g. ``docker.io/library/nginx``."""
        path = self.path
        if self.registry == DEFAULT_DOMAIN and "/" not in path:
            path = OFFICIAL_REPOSITORY_PREFIX + path
        return f"{self.registry}/{path}"

    @property
    def canonical(self) -> str:
        """Return the fully qualified form for display, with ``latest`` when no tag or digest is given."""
        text = self.repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        if self.tag is None and self.digest is None:
            text += f":{DEFAULT_TAG}"
        return text


def _invalid(message: str, value: str) -> InvalidInputError:
    return InvalidInputError(message, field=FIELD, value=value)


def _check_characters(value: str) -> None:
    if not value:
        raise _invalid("image reference is empty: give one such as 'nginx:1.27'", value)
    for character in value:
        if character.isspace() or not character.isprintable():
            raise _invalid(
                f"image reference must not contain whitespace or control characters "
                f"(found {character!r}): {value!r}",
                value,
            )
    if value.startswith("-"):
        raise _invalid(f"image reference must not start with '-': {value!r}", value)
    for character in value:
        if not _ALLOWED_CHARACTER.fullmatch(character):
            raise _invalid(
                f"image reference contains {character!r}, which is not allowed; a reference "
                f"has only letters, digits and . _ - : / @ [ ]: {value!r}",
                value,
            )
    if len(value) > MAX_REFERENCE_LENGTH:
        raise _invalid(
            f"image reference is {len(value)} characters long, more than the maximum of "
            f"{MAX_REFERENCE_LENGTH}: {value[:40]!r}...",
            value,
        )


def _parse_digest(text: str, value: str) -> str:
    algorithm, colon, encoded = text.partition(":")
    if not colon or not algorithm or not encoded:
        raise _invalid(
            f"digest must be written as algorithm:hex, e.g. sha256:<64 hex digits>: {text!r}",
            value,
        )
    if not _DIGEST_ALGORITHM.fullmatch(algorithm):
        raise _invalid(f"digest algorithm is invalid: {algorithm!r} in {value!r}", value)
    expected = DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is None:
        raise _invalid(
            f"digest algorithm {algorithm!r} is not supported; use sha256 or sha512: {value!r}",
            value,
        )
    if not _LOWERCASE_HEX.fullmatch(encoded) or len(encoded) != expected:
        raise _invalid(
            f"{algorithm} digest must be {expected} lowercase hex digits, got "
            f"{len(encoded)} characters: {text!r}",
            value,
        )
    return text


def _check_domain(domain: str, value: str) -> None:
    host, port = domain, None
    if domain.startswith("["):
        end = domain.find("]")
        if end == -1:
            raise _invalid(f"registry host {domain!r} has '[' without ']' in {value!r}", value)
        host, rest = domain[: end + 1], domain[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _invalid(f"registry host {domain!r} is invalid in {value!r}", value)
            port = rest[1:]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _invalid(
                f"registry host {host!r} is not a valid IPv6 address in {value!r}", value
            ) from None
    else:
        if ":" in domain:
            host, port = domain.split(":", 1)
        components = host.split(".")
        if not host or not all(_DOMAIN_COMPONENT.fullmatch(part) for part in components):
            raise _invalid(
                f"registry host {host!r} is invalid: use a host name, an IPv4 address or a "
                f"bracketed IPv6 address, optionally with :port, in {value!r}",
                value,
            )
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise _invalid(
                f"registry port {port!r} is invalid: use a number from 1 to 65535 in {value!r}",
                value,
            )


def _check_path(path: str, value: str) -> None:
    if not path:
        raise _invalid(f"repository name is missing in {value!r}", value)
    if path != path.lower():
        raise _invalid(f"repository name must be lowercase: {path!r}", value)
    for component in path.split("/"):
        if not component:
            raise _invalid(f"repository name has an empty path component: {path!r}", value)
        if not _PATH_COMPONENT.fullmatch(component):
            raise _invalid(
                f"repository path component {component!r} is invalid: use lowercase letters "
                "and digits, joined by '.', '_', '__' or '-', starting and ending with a "
                f"letter or digit, in {value!r}",
                value,
            )


def _split_domain(name: str) -> tuple[str | None, str]:
    """Split ``name`` into its registry domain (if the first component is one) and path.

    As in the Docker CLI, the first component is a registry when it contains
    a dot or a colon, is ``localhost``, or is a bracketed IPv6 address.
    """
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        return first, rest
    return None, name


def parse_reference(value: str) -> ImageReference:
    """Parse an image reference; raise InvalidInputError naming the problem and the value."""
    _check_characters(value)
    scheme = _URL_SCHEME.match(value)
    if scheme:
        # Without this check the scheme's colon reads as a registry port: "port '' is invalid".
        raise _invalid(
            f"image reference {value!r} starts with the URL scheme {scheme.group()!r}, but "
            f"image references have no URL scheme: write {value[scheme.end() :]!r}",
            value,
        )

    name_and_tag, at, digest_text = value.partition("@")
    digest = None
    if at:
        if "@" in digest_text:
            raise _invalid(f"image reference has more than one '@': {value!r}", value)
        digest = _parse_digest(digest_text, value)
    if not name_and_tag:
        raise _invalid(f"repository name is missing in {value!r}", value)

    # The tag follows the last ':' after the last '/'; an earlier ':' belongs to a port.
    name, tag = name_and_tag, None
    colon = name_and_tag.rfind(":")
    if colon > name_and_tag.rfind("/") and not name_and_tag.endswith("]"):
        name, tag = name_and_tag[:colon], name_and_tag[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise _invalid(
                f"tag {tag!r} is invalid: use up to 128 letters, digits, '_', '.' and '-', "
                f"not starting with '.' or '-', in {value!r}",
                value,
            )

    if len(name) > MAX_NAME_LENGTH:
        raise _invalid(
            f"repository name is {len(name)} characters long, more than the maximum of "
            f"{MAX_NAME_LENGTH}: {name[:40]!r}...",
            value,
        )

    domain, path = _split_domain(name)
    if domain is not None:
        _check_domain(domain, value)
    _check_path(path, value)
    return ImageReference(original=value, domain=domain, path=path, tag=tag, digest=digest)


def check_scannable(reference: ImageReference) -> None:
    """Raise InvalidInputError for a valid reference that Trivy v0.74.0 cannot pull.

    Trivy reads registries with go-containerregistry (v0.21.9), which is
    stricter than the grammar: a repository path has at least 2 characters,
    and only sha256 digests are supported. A scan of such a reference would
    only fail later with reason ScannerError.
    """
    if len(reference.path) < 2:
        raise _invalid(
            f"repository path {reference.path!r} is shorter than 2 characters, which Trivy "
            f"cannot pull; use the full repository path in {reference.original!r}",
            reference.original,
        )
    if reference.digest is not None and not reference.digest.startswith("sha256:"):
        raise _invalid(
            f"Trivy pulls images by sha256 digest only; give the image's sha256 digest or a "
            f"tag instead of {reference.digest.partition(':')[0]} in {reference.original!r}",
            reference.original,
        )
