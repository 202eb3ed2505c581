"""Turn a container of a pod spec into a local process: argv, environment and folder.

There is no image and no mount namespace, so the container's mount paths
cannot exist. Instead every absolute `mountPath` found in the command, the
arguments, the environment values and `workingDir` is rewritten to the local
folder of its volume, so `--cache-dir /tmp/trivy` becomes
`--cache-dir <state>/pods/<pod>/volumes/cache`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import ConfigError, SourceCache, field_value, resource_value

_VARIABLE_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


@dataclass(frozen=True)
class ProcessSpec:
    """What to run for one container."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path


def expand_references(text: str, variables: Mapping[str, str]) -> str:
    """Expand `$(NAME)` as Kubernetes does: `$$` stands for `$`, unknown names stay as written."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return variables.get(match.group(1), match.group(0))

    return _VARIABLE_REFERENCE.sub(replace, text)


class MountRewriter:
    """Replaces a container's absolute mount paths with local folders inside strings."""

    def __init__(self, mounts: Mapping[str, Path]) -> None:
        self._mounts = {path.rstrip("/") or "/": str(local) for path, local in mounts.items()}
        # Longer paths first, so /secrets/docker wins over /secrets. Only whole
        # paths match, never a part of /x/secrets or /secrets-old.
        alternatives = "|".join(
            re.escape(path) for path in sorted(self._mounts, key=len, reverse=True) if path != "/"
        )
        self._pattern = (
            re.compile(rf"(?<![\w.\-/])({alternatives})(?![\w.\-])") if alternatives else None
        )

    def rewrite(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: self._mounts[match.group(1)], text)


def container_mounts(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> dict[str, Path]:
    """Map each absolute mount path of a container to its local folder."""
    mounts = {}
    for mount in container.get("volumeMounts") or []:
        folder = volumes.get(mount.get("name", ""))
        if folder is None:
            raise ConfigError(f"volumeMount {mount.get('name')!r} names no volume of the pod")
        sub_path = mount.get("subPath") or ""
        if sub_path:
            folder = folder / sub_path
            if not folder.exists():
                folder.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = folder
    return mounts


def _environment(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    sources: SourceCache,
    allocatable: Mapping[str, str],
) -> dict[str, str]:
    """Resolve `envFrom` and `env` in the order Kubernetes applies them."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            reference = source["secretRef"]
            data = sources.secret(
                reference.get("name", ""), optional=bool(reference.get("optional"))
            )
        else:
            reference = source.get("configMapRef", {})
            data = sources.config_map(
                reference.get("name", ""), optional=bool(reference.get("optional"))
            )
        for key, value in (data or {}).items():
            env[prefix + key] = value.decode("utf-8", "replace")

    for variable in container.get("env") or []:
        name = variable["name"]
        if "valueFrom" not in variable:
            env[name] = expand_references(variable.get("value", ""), env)
            continue
        source = variable["valueFrom"]
        if "secretKeyRef" in source:
            raw = sources.key("secret", source["secretKeyRef"])
            if raw is not None:
                env[name] = raw.decode("utf-8", "replace")
        elif "configMapKeyRef" in source:
            raw = sources.key("configMap", source["configMapKeyRef"])
            if raw is not None:
                env[name] = raw.decode("utf-8", "replace")
        elif "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"].get("fieldPath", ""))
        elif "resourceFieldRef" in source:
            env[name] = resource_value(container, source["resourceFieldRef"], allocatable)
        else:
            raise ConfigError(f"environment variable {name} has an unsupported valueFrom")
    return env


def build_process_spec(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    *,
    volumes: Mapping[str, Path],
    work_dir: Path,
    overrides: Mapping[str, str],
    base_path: str,
    sources: SourceCache,
    allocatable: Mapping[str, str],
) -> ProcessSpec:
    """Build the process of one container.

    The environment is the container's own, with mount paths rewritten, and
    `overrides` replace its values. Only PATH is combined: the override goes in
    front of the container's PATH, or of `base_path` when it has none. Raises
    `ConfigError` when a referenced Secret, ConfigMap or key is missing.
    """
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if not command:
        # There is no image whose entrypoint could stand in.
        raise ConfigError(
            f"container {container['name']} has no command; the test bed kubelet has no "
            "image entrypoint to run, so give the container an explicit command"
        )

    rewriter = MountRewriter(container_mounts(container, volumes))
    env = _environment(pod, container, sources, allocatable)
    argv = [rewriter.rewrite(expand_references(item, env)) for item in command + args]
    env = {name: rewriter.rewrite(value) for name, value in env.items()}

    env.setdefault("HOSTNAME", pod["metadata"]["name"])
    env.setdefault("HOME", str(work_dir))
    for name, value in overrides.items():
        if name == "PATH":
            env["PATH"] = f"{value}:{env.get('PATH', base_path)}"
        else:
            env[name] = value
    env.setdefault("PATH", base_path)

    cwd = work_dir
    if container.get("workingDir"):
        rewritten = Path(rewriter.rewrite(container["workingDir"]))
        if rewritten != Path(container["workingDir"]):
            cwd = rewritten
    return ProcessSpec(argv=argv, env=env, cwd=cwd)
