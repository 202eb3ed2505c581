"""Build the fixture images of `images/catalog.yaml` and push them to a registry.

Each image is assembled from small rootfs folders under `images/` (plus files
generated here, so the repository stays small and contains no
secret-shaped string), turned into an OCI layout with umoci and pushed with skopeo. The
non-image artifact is pushed with plain registry HTTP calls, because neither
tool writes a manifest without an image config.

A repeat run is fast: each OCI layout is cached in `work_dir` under a hash of
its inputs, and an image whose manifest digest the registry already serves is
not pushed again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import Any, cast

import yaml

from tests.testbed import system_packages

log = logging.getLogger("testbed")

IMAGES_DIR = Path(__file__).resolve().parent / "images"
CATALOG_PATH = IMAGES_DIR / "catalog.yaml"

# Bump when the build steps below change, so cached layouts are rebuilt.
BUILD_FORMAT = "1"
CREATED = "2024-01-01T00:00:00Z"
TOOL_TIMEOUT_SECONDS = 300
HTTP_TIMEOUT_SECONDS = 30

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"


class FixtureImageError(RuntimeError):
    """Building or pushing a fixture image failed; the message names the image and the cause."""


def load_catalog() -> list[dict[str, Any]]:
    """Return the entries of `images/catalog.yaml`, one per pushed reference."""
    with CATALOG_PATH.open() as file:
        catalog = yaml.safe_load(file)
    entries = catalog["images"]
    assert isinstance(entries, list)
    return entries


def reference(entry: dict[str, Any]) -> str:
    """Return the repository path and tag of a catalog entry, such as `fixtures/alpine:3.17`."""
    return f"{entry['name']}:{entry['tag']}"


def publish_images(registry: str, work_dir: Path) -> None:
    """Build every catalog image under `work_dir` and push it to `registry` (`127.0.0.1:PORT`)."""
    _check_loopback(registry)
    _ensure_tools()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    for entry in load_catalog():
        kind = entry["kind"]
        if kind == "image":
            layout = _image_layout(entry, work_dir)
            _push_layout(layout, entry, registry, all_platforms=False)
        elif kind == "index":
            layout = _index_layout(entry, work_dir)
            _push_layout(layout, entry, registry, all_platforms=True)
        elif kind == "artifact":
            _push_artifact(entry, registry)
        else:
            raise FixtureImageError(
                f"catalog entry {reference(entry)} has unknown kind {kind!r}; "
                "use image, index or artifact"
            )


def _check_loopback(registry: str) -> None:
    host = registry.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise FixtureImageError(
            f"registry {registry!r} is not on the loopback interface; pass 127.0.0.1:PORT"
        )


def _ensure_tools() -> None:
    # ensure_packages installs umoci and skopeo (and the bed's other Debian
    # packages) when missing, or names the apt-get command to run.
    if shutil.which("umoci") is None or shutil.which("skopeo") is None:
        system_packages.ensure_packages()


# --- single-platform images -----------------------------------------------------


def _image_layout(entry: dict[str, Any], work_dir: Path) -> Path:
    """Return a finished OCI layout holding the entry's image under its tag."""
    build = entry["build"]
    layout = work_dir / "oci" / f"{_safe_name(entry)}-{_inputs_hash(entry)}"
    if (layout / ".complete").exists():
        return layout

    shutil.rmtree(layout, ignore_errors=True)
    _umoci("init", "--layout", str(layout))
    _build_platform(layout, entry["tag"], build, work_dir)
    (layout / ".complete").touch()
    return layout


def _build_platform(layout: Path, tag: str, build: dict[str, Any], work_dir: Path) -> None:
    stage = work_dir / "stage" / f"{layout.name}-{tag}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _stage_rootfs(build, stage)
        image = f"{layout}:{tag}"
        _umoci("new", "--image", image)
        _umoci("insert", "--image", image, str(stage), "/")
        architecture = build.get("architecture", "amd64")
        _umoci(
            "config",
            "--image",
            image,
            "--os",
            "linux",
            "--architecture",
            architecture,
            "--created",
            CREATED,
            "--history.created",
            CREATED,
            "--config.workingdir",
            "/",
        )
        # umoci keeps the unreferenced blobs of the intermediate steps.
        _umoci("gc", "--layout", str(layout))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):
            stage.parent.rmdir()  # only succeeds once no other staging folder is left


def _stage_rootfs(build: dict[str, Any], stage: Path) -> None:
    stage.mkdir(parents=True)
    for folder in build.get("rootfs", []):
        shutil.copytree(IMAGES_DIR / folder, stage, dirs_exist_ok=True)

    copies = build.get("copies")
    if copies:
        source = IMAGES_DIR / copies["source"]
        for index in range(1, copies["count"] + 1):
            target = stage / copies["target"].format(index=index)
            shutil.copytree(source, target, dirs_exist_ok=True)

    for generated in build.get("generated", []):
        path = stage / generated["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_GENERATORS[generated["content"]]())


def _fake_credentials() -> str:
    """Return an env file with two made-up credentials in well-known token formats.

    Trivy's built-in rules find them by pattern (github-pat: "ghp_" and 36
    letters or digits; aws-access-key-id: "AKIA" and 16 capitals or digits).
    They are assembled here, not stored, so the repository itself contains
    nothing that a secret scanner would flag, and they are not real keys.
    """
    github_token = "ghp_" + "SecapiFixtureTokenNotReal".ljust(36, "0")
    aws_key_id = "AKIA" + "SECAPIFIXTURE".ljust(16, "0")
    return (
        "# Deployment settings of the fixture app; the values are fake.\n"
        "APP_ENV=production\n"
        f"GITHUB_TOKEN={github_token}\n"
        f"AWS_ACCESS_KEY_ID={aws_key_id}\n"
    )


_GENERATORS = {"fake-credentials": _fake_credentials}


# --- multi-platform index --------------------------------------------------------


def _index_layout(entry: dict[str, Any], work_dir: Path) -> Path:
    """Return an OCI layout whose tag names an index of one manifest per platform."""
    layout = work_dir / "oci" / f"{_safe_name(entry)}-{_inputs_hash(entry)}"
    if (layout / ".complete").exists():
        return layout

    shutil.rmtree(layout, ignore_errors=True)
    _umoci("init", "--layout", str(layout))
    descriptors = []
    for platform in entry["platforms"]:
        os_name, architecture = platform["platform"].split("/")
        platform_tag = f"{entry['tag']}-{architecture}"
        _build_platform(
            layout, platform_tag, {**platform["build"], "architecture": architecture}, work_dir
        )
        descriptor = dict(_tagged_descriptor(layout, platform_tag))
        descriptor.pop("annotations", None)
        descriptor["platform"] = {"architecture": architecture, "os": os_name}
        descriptors.append(descriptor)

    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    index_bytes = json.dumps(index, indent=2, sort_keys=True).encode()
    digest = _write_blob(layout, index_bytes)
    _add_tag(
        layout, entry["tag"], {"mediaType": OCI_INDEX, "digest": digest, "size": len(index_bytes)}
    )
    (layout / ".complete").touch()
    return layout


def _tagged_descriptor(layout: Path, tag: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    for descriptor in index["manifests"]:
        if descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            assert isinstance(descriptor, dict)
            return descriptor
    raise FixtureImageError(f"tag {tag!r} is missing from OCI layout {layout}")


def _add_tag(layout: Path, tag: str, descriptor: dict[str, Any]) -> None:
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    descriptor = {**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}}
    index["manifests"].append(descriptor)
    index_path.write_text(json.dumps(index))


def _write_blob(layout: Path, content: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(content)
    return digest


# --- pushing ---------------------------------------------------------------------


def _push_layout(
    layout: Path, entry: dict[str, Any], registry: str, *, all_platforms: bool
) -> None:
    wanted = _tagged_descriptor(layout, entry["tag"])["digest"]
    if _registry_digest(registry, entry) == wanted:
        log.debug("%s is up to date in %s", reference(entry), registry)
        return

    command = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if all_platforms:
        command.append("--all")
    command += [f"oci:{layout}:{entry['tag']}", f"docker://{registry}/{reference(entry)}"]
    _run(command)

    pushed = _registry_digest(registry, entry)
    if pushed != wanted:
        raise FixtureImageError(
            f"pushing {reference(entry)} to {registry} stored manifest {pushed}, "
            f"expected {wanted}; skopeo may have converted the manifest"
        )
    log.info("pushed %s to %s", reference(entry), registry)


def _push_artifact(entry: dict[str, Any], registry: str) -> None:
    """Push an OCI artifact: a manifest with an empty config and one file layer."""
    build = entry["build"]
    content = (IMAGES_DIR / build["file"]).read_bytes()
    empty_config = b"{}"

    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": build["artifact_type"],
        "config": {
            "mediaType": OCI_EMPTY,
            "digest": _sha256(empty_config),
            "size": len(empty_config),
            "data": base64.b64encode(empty_config).decode(),
        },
        "layers": [
            {
                "mediaType": build["media_type"],
                "digest": _sha256(content),
                "size": len(content),
                "annotations": {"org.opencontainers.image.title": Path(build["file"]).name},
            }
        ],
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if _registry_digest(registry, entry) == _sha256(manifest_bytes):
        return

    for blob in (empty_config, content):
        _upload_blob(registry, entry["name"], blob)
    url = f"http://{registry}/v2/{entry['name']}/manifests/{entry['tag']}"
    _http("PUT", url, data=manifest_bytes, headers={"Content-Type": OCI_MANIFEST})
    log.info("pushed artifact %s to %s", reference(entry), registry)


def _upload_blob(registry: str, repository: str, blob: bytes) -> None:
    digest = _sha256(blob)
    base = f"http://{registry}"
    if _http("HEAD", f"{base}/v2/{repository}/blobs/{digest}", allow_missing=True) is not None:
        return

    response = _http("POST", f"{base}/v2/{repository}/blobs/uploads/")
    assert response is not None
    location = response.headers["Location"]
    if location.startswith("/"):
        location = base + location
    separator = "&" if "?" in location else "?"
    _http(
        "PUT",
        f"{location}{separator}digest={digest}",
        data=blob,
        headers={"Content-Type": "application/octet-stream"},
    )


def _registry_digest(registry: str, entry: dict[str, Any]) -> str | None:
    """Return the digest of the manifest the registry serves for the entry, or None."""
    url = f"http://{registry}/v2/{entry['name']}/manifests/{entry['tag']}"
    accept = ", ".join([OCI_MANIFEST, OCI_INDEX])
    response = _http("HEAD", url, headers={"Accept": accept}, allow_missing=True)
    if response is None:
        return None
    return response.headers.get("Docker-Content-Digest")


def _http(
    method: str,
    url: str,
    *,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    allow_missing: bool = False,
) -> HTTPResponse | None:
    # The URL is always http://127.0.0.1:PORT/... (publish_images checks the registry).
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:  # noqa: S310
            response.read()
            return cast(HTTPResponse, response)
    except urllib.error.HTTPError as error:
        if allow_missing and error.code == 404:
            return None
        body = error.read().decode(errors="replace")[:500]
        raise FixtureImageError(f"{method} {url} failed with HTTP {error.code}: {body}") from error
    except urllib.error.URLError as error:
        raise FixtureImageError(
            f"{method} {url} failed: {error.reason}; is the registry running?"
        ) from error


# --- helpers ---------------------------------------------------------------------


def _inputs_hash(entry: dict[str, Any]) -> str:
    """Hash everything a layout is built from: the recipe, rootfs files and this format."""
    digest = hashlib.sha256()
    digest.update(BUILD_FORMAT.encode())
    recipe = {key: entry.get(key) for key in ("name", "tag", "kind", "build", "platforms")}
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    for path in _input_files(entry):
        digest.update(str(path.relative_to(IMAGES_DIR)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    generated = [item["content"] for build in _builds(entry) for item in build.get("generated", [])]
    for name in generated:
        digest.update(_GENERATORS[name]().encode())
    return digest.hexdigest()[:16]


def _builds(entry: dict[str, Any]) -> list[dict[str, Any]]:
    if "platforms" in entry:
        return [platform["build"] for platform in entry["platforms"]]
    return [entry["build"]]


def _input_files(entry: dict[str, Any]) -> Iterator[Path]:
    folders = []
    for build in _builds(entry):
        folders += [IMAGES_DIR / folder for folder in build.get("rootfs", [])]
        if build.get("copies"):
            folders.append(IMAGES_DIR / build["copies"]["source"])
    for folder in folders:
        if not folder.is_dir():
            raise FixtureImageError(f"rootfs folder {folder} of {reference(entry)} does not exist")
        yield from sorted(path for path in folder.rglob("*") if path.is_file())


def _safe_name(entry: dict[str, Any]) -> str:
    return reference(entry).replace("/", "_").replace(":", "_")


def _sha256(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def _umoci(*args: str) -> None:
    _run(["umoci", *args])


def _run(command: list[str]) -> None:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS, check=False
    )
    if result.returncode != 0:
        raise FixtureImageError(
            f"{shlex.join(command)} failed with exit code {result.returncode}: "
            f"{result.stderr.strip()}"
        )
