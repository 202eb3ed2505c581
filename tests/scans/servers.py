"""Loopback servers and images that the scan tests make for themselves.

An htpasswd-protected registry, a TCP server that accepts connections and
never responds, a port with nothing listening, and images built from a few
files with umoci and pushed with skopeo. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

LOOPBACK = "127.0.0.1"
REGISTRY_USER = "scan-tester"
REGISTRY_PASSWORD = "Reg1stry-Passw0rd-for-tests"


def unused_port() -> int:
    """Return a loopback port that nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _bcrypt(password: str) -> str:
    # docker-registry's htpasswd accepts bcrypt only; glibc's crypt makes it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    # bcrypt is what the registry requires; ruff flags crypt by module, not by method.
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))  # noqa: S324


@dataclass(frozen=True)
class AuthRegistry:
    address: str
    username: str
    password: str


def _registry_up(address: str) -> bool:
    try:
        urllib.request.urlopen(f"http://{address}/v2/", timeout=1)
    except urllib.error.HTTPError as error:
        return error.code == 401
    except OSError:
        return False
    return False


@contextlib.contextmanager
def auth_registry(folder: Path) -> Iterator[AuthRegistry]:
    """Run docker-registry with htpasswd authentication on a free loopback port."""
    folder.mkdir(parents=True, exist_ok=True)
    htpasswd = folder / "htpasswd"
    htpasswd.write_text(f"{REGISTRY_USER}:{_bcrypt(REGISTRY_PASSWORD)}\n")
    port = unused_port()
    address = f"{LOOPBACK}:{port}"
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(folder / "data")}},
        "auth": {"htpasswd": {"realm": "scan-tests", "path": str(htpasswd)}},
        "http": {"addr": address},
    }
    config_file = folder / "registry.yaml"
    config_file.write_text(yaml.safe_dump(config))
    with (folder / "registry.log").open("wb") as log:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config_file)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while not _registry_up(address):
            assert process.poll() is None, (folder / "registry.log").read_text()
            assert time.monotonic() < deadline, "the htpasswd registry did not start in 30 s"
            time.sleep(0.1)
        yield AuthRegistry(address=address, username=REGISTRY_USER, password=REGISTRY_PASSWORD)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """Accept TCP connections on a loopback port and never send a byte; yield host:port."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(64)
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                connection, _ = listener.accept()
                accepted.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"{LOOPBACK}:{listener.getsockname()[1]}"
    finally:
        stopping.set()
        thread.join(timeout=5)
        for connection in accepted:
            connection.close()
        listener.close()


def copy_image(source: str, destination: str, *, dest_creds: str | None = None) -> None:
    """Copy an image between loopback registries with skopeo."""
    command = [
        "skopeo",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ]
    if dest_creds:
        command += ["--dest-creds", dest_creds]
    command += [f"docker://{source}", f"docker://{destination}"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def push_files_image(files: dict[str, str], *, work: Path, destination: str) -> None:
    """Build a one-layer image holding ``files`` (path -> text) and push it to ``destination``."""
    rootfs = work / "rootfs"
    for relative, content in files.items():
        path = rootfs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    layout = work / "layout"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=120)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:image")
    umoci("insert", "--image", f"{layout}:image", str(rootfs), "/")
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:image",
            f"docker://{destination}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
