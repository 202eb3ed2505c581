"""Build the test bed's Go binaries from Go modules, once per version.

Each tool is built in its own throwaway wrapper module, so the dependency
graphs of Trivy, Kubernetes, etcd and Helm never lift each other's versions.
A main module's ``replace`` lines are not inherited by a consumer, so the
wrapper copies them: a replace that points at a published module is kept as
it is, and one that points at a local folder (Kubernetes' ``staging/``) is
redirected to the published module of the matching version.

Binaries land in ``$SECAPI_CACHE/bin/<tool>-<version>/`` (default
``~/.cache/secapi``), outside the repository, and a finished folder is reused.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("SECAPI_CACHE", Path.home() / ".cache" / "secapi"))
KUBERNETES_VERSION = "v1.37.2"
# Published staging modules (k8s.io/api, k8s.io/client-go, ...) carry the
# Kubernetes minor version with a leading zero major: v1.37.2 -> v0.37.2.
STAGING_VERSION = "v0" + KUBERNETES_VERSION[2:]


@dataclass(frozen=True)
class Tool:
    name: str
    module: str
    version: str
    packages: dict[str, str]  # binary name -> Go package path
    ldflags: str = ""
    env: dict[str, str] = field(default_factory=dict)
    local_replace_version: str | None = None


def _kube_ldflags() -> str:
    stamp = [
        ("k8s.io/component-base/version.gitVersion", KUBERNETES_VERSION),
        ("k8s.io/client-go/pkg/version.gitVersion", KUBERNETES_VERSION),
        ("k8s.io/component-base/version.gitMajor", "1"),
        ("k8s.io/component-base/version.gitMinor", KUBERNETES_VERSION.split(".")[1]),
        ("k8s.io/client-go/pkg/version.gitMajor", "1"),
        ("k8s.io/client-go/pkg/version.gitMinor", KUBERNETES_VERSION.split(".")[1]),
        ("k8s.io/component-base/version.gitTreeState", "clean"),
        ("k8s.io/component-base/version.buildDate", "1970-01-01T00:00:00Z"),
    ]
    return " ".join(f"-X {key}={value}" for key, value in stamp)


TOOLS: dict[str, Tool] = {
    "trivy": Tool(
        name="trivy",
        module="github.com/aquasecurity/trivy",
        version="v0.74.0",
        packages={"trivy": "github.com/aquasecurity/trivy/cmd/trivy"},
        ldflags="-X github.com/aquasecurity/trivy/pkg/version/app.ver=0.74.0",
        # NOTE: Trivy's release build sets GOEXPERIMENT=jsonv2; without it the
        # build fails on encoding/json/v2 imports.
        env={"GOEXPERIMENT": "jsonv2"},
    ),
    "etcd": Tool(
        name="etcd",
        module="go.etcd.io/etcd/server/v3",
        version="v3.7.3",
        packages={"etcd": "go.etcd.io/etcd/server/v3"},
        local_replace_version="v3.7.3",
    ),
    "kubernetes": Tool(
        name="kubernetes",
        module="k8s.io/kubernetes",
        version=KUBERNETES_VERSION,
        packages={
            "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
            "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kubectl": "k8s.io/kubernetes/cmd/kubectl",
        },
        ldflags=_kube_ldflags(),
        local_replace_version=STAGING_VERSION,
    ),
    "helm": Tool(
        name="helm",
        module="helm.sh/helm/v4",
        version="v4.3.2",
        packages={"helm": "helm.sh/helm/v4/cmd/helm"},
        ldflags="-X helm.sh/helm/v4/internal/version.version=v4.3.2",
    ),
}

_REPLACE_LINE = re.compile(r"^\s*(?:replace\s+)?(\S+)(?:\s+(\S+))?\s+=>\s+(\S+)(?:\s+(\S+))?\s*$")


def tool_dir(tool: Tool) -> Path:
    return CACHE_ROOT / "bin" / f"{tool.name}-{tool.version}"


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOTOOLCHAIN", "local")
    env.setdefault("CGO_ENABLED", "0")
    env.setdefault("GOFLAGS", "-buildvcs=false")
    return env


def _run(args: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"command failed ({result.returncode}): {' '.join(args)}\n{result.stderr[-4000:]}"
        )
    return result.stdout


def _parse_replaces(gomod_text: str) -> list[tuple[str, str | None, str, str | None]]:
    """Return (old path, old version, new path, new version) for each replace."""
    replaces = []
    in_block = False
    for raw in gomod_text.splitlines():
        line = raw.split("//", 1)[0].strip()
        if in_block:
            if line == ")":
                in_block = False
                continue
        elif line.startswith("replace ("):
            in_block = True
            continue
        elif not line.startswith("replace "):
            continue
        match = _REPLACE_LINE.match(line)
        if match:
            old, old_version, new, new_version = match.groups()
            replaces.append((old, old_version, new, new_version))
    return replaces


def _wrapper_replaces(tool: Tool, gomod_text: str) -> list[str]:
    lines = []
    for old, old_version, new, new_version in _parse_replaces(gomod_text):
        left = f"{old} {old_version}" if old_version else old
        if new.startswith("./") or new.startswith("../"):
            if tool.local_replace_version is None:
                raise SystemExit(
                    f"{tool.module}@{tool.version} replaces {old} with the local "
                    f"folder {new}; set local_replace_version for this tool"
                )
            lines.append(f"\t{left} => {old} {tool.local_replace_version}")
        else:
            lines.append(f"\t{left} => {new} {new_version}")
    return lines


@contextlib.contextmanager
def _build_lock(tool: Tool) -> Iterator[None]:
    # Two builds of one tool would delete each other's staging folder, so the
    # second waits here for the first and then finds its `.complete` file.
    lock_path = tool_dir(tool).with_name(f".{tool.name}-{tool.version}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build(tool: Tool) -> Path:
    """Build every binary of one tool into its cache folder and return it."""
    target = tool_dir(tool)
    if (target / ".complete").exists():
        return target
    with _build_lock(tool):
        if (target / ".complete").exists():
            return target
        return _build_unlocked(tool, target)


def _build_unlocked(tool: Tool, target: Path) -> Path:
    env = _go_env()
    env.update(tool.env)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"secapi-build-{tool.name}-") as tmp:
        work = Path(tmp)

        # Read the main module's own go.mod to learn its go version and replaces.
        info = json.loads(
            _run(
                ["go", "mod", "download", "-json", f"{tool.module}@{tool.version}"],
                cwd=work,
                env=env,
            )
        )
        gomod_text = Path(info["GoMod"]).read_text()
        go_line = next(
            (line for line in gomod_text.splitlines() if line.startswith("go ")), "go 1.26"
        )
        replaces = _wrapper_replaces(tool, gomod_text)
        wrapper = [f"module secapi.local/build/{tool.name}", "", go_line, ""]
        wrapper.append(f"require {tool.module} {tool.version}")
        if replaces:
            wrapper += ["", "replace (", *replaces, ")"]
        (work / "go.mod").write_text("\n".join(wrapper) + "\n")

        # go get resolves the whole graph and records go.sum for the packages.
        for package in tool.packages.values():
            _run(["go", "get", f"{package}@{tool.version}"], cwd=work, env=env)

        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for binary, package in tool.packages.items():
            ldflags = f"-s -w {tool.ldflags}".strip()
            _run(
                [
                    "go",
                    "build",
                    "-trimpath",
                    "-ldflags",
                    ldflags,
                    "-o",
                    str(staging / binary),
                    package,
                ],
                cwd=work,
                env=env,
            )
        (staging / ".complete").write_text(f"built in {time.monotonic() - started:.0f} s\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "tools", nargs="*", default=list(TOOLS), help="tools to build (default: all)"
    )
    parser.add_argument(
        "--print-dir", action="store_true", help="only print each tool's cache folder"
    )
    args = parser.parse_args()
    for name in args.tools:
        if name not in TOOLS:
            parser.error(f"unknown tool {name!r}; choose from {', '.join(TOOLS)}")
        tool = TOOLS[name]
        if args.print_dir:
            print(tool_dir(tool))
            continue
        if (tool_dir(tool) / ".complete").exists():
            print(f"{tool.name} {tool.version}: cached in {tool_dir(tool)}", file=sys.stderr)
            continue
        started = time.monotonic()
        print(f"building {tool.name} {tool.version} ...", file=sys.stderr, flush=True)
        path = build(tool)
        print(
            f"{tool.name} {tool.version}: {path} ({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
