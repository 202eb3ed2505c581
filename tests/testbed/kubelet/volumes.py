"""Pod volumes as folders of the pod's state folder.

emptyDir volumes are empty folders. Secret, configMap, downwardAPI and
projected volumes are folders whose files are written once, when the pod
starts. A hostPath volume is the host path itself, since every container runs
on this machine. Other volume types get an empty folder and a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from .sources import ConfigError, SourceCache, field_value

logger = logging.getLogger(__name__)

# Octal 0644, the API's default file mode for secret and configMap volumes.
DEFAULT_MODE = 0o644


def _safe_relative(path: str, volume: str) -> PurePosixPath:
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ConfigError(f"volume {volume} has an invalid item path {path!r}")
    return relative


def _write_files(
    folder: Path,
    data: Mapping[str, bytes],
    items: list[Mapping[str, Any]] | None,
    default_mode: int,
    volume: str,
    optional: bool,
) -> None:
    """Write a Secret's or ConfigMap's keys, or only the listed `items`, as files."""
    chosen: list[tuple[PurePosixPath, bytes, int]] = []
    if items:
        for item in items:
            key = item.get("key", "")
            if key not in data:
                if optional:
                    continue
                raise ConfigError(f"volume {volume} references key {key}, which does not exist")
            path = _safe_relative(item.get("path", key), volume)
            chosen.append((path, data[key], int(item.get("mode", default_mode))))
    else:
        chosen = [(_safe_relative(key, volume), value, default_mode) for key, value in data.items()]

    for relative, content, mode in chosen:
        target = folder.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        os.chmod(target, mode & 0o777)


def _write_downward_api(
    folder: Path,
    pod: Mapping[str, Any],
    items: list[Mapping[str, Any]],
    default_mode: int,
    volume: str,
) -> None:
    for item in items:
        if "fieldRef" not in item:
            logger.warning(
                "Volume %s of pod %s/%s uses a downwardAPI item other than fieldRef; "
                "the kubelet leaves that file out.",
                volume,
                pod["metadata"]["namespace"],
                pod["metadata"]["name"],
            )
            continue
        value = field_value(pod, item["fieldRef"].get("fieldPath", "")).encode()
        _write_files(
            folder,
            {"value": value},
            [{"key": "value", "path": item.get("path", "")}],
            default_mode,
            volume,
            False,
        )


def _fill_projected(
    folder: Path, pod: Mapping[str, Any], volume: Mapping[str, Any], sources: SourceCache
) -> None:
    name = volume["name"]
    projected = volume["projected"]
    default_mode = int(projected.get("defaultMode", DEFAULT_MODE))
    for source in projected.get("sources") or []:
        if "secret" in source or "configMap" in source:
            kind = "secret" if "secret" in source else "configMap"
            spec = source[kind]
            optional = bool(spec.get("optional", False))
            fetch = sources.secret if kind == "secret" else sources.config_map
            data = fetch(spec.get("name", ""), optional=optional)
            if data is not None:
                _write_files(folder, data, spec.get("items"), default_mode, name, optional)
        elif "downwardAPI" in source:
            _write_downward_api(
                folder, pod, source["downwardAPI"].get("items") or [], default_mode, name
            )
        else:
            logger.warning(
                "Projected volume %s of pod %s/%s has a source of kind %s, which the "
                "test bed kubelet does not support; its files are missing.",
                name,
                pod["metadata"]["namespace"],
                pod["metadata"]["name"],
                ", ".join(source),
            )


def prepare_volumes(pod: Mapping[str, Any], root: Path, sources: SourceCache) -> dict[str, Path]:
    """Create the folder of every volume of a pod and return them by volume name.

    Raises `ConfigError` when a referenced Secret, ConfigMap or key is missing.
    """
    folders: dict[str, Path] = {}
    for volume in pod.get("spec", {}).get("volumes") or []:
        name = volume["name"]
        if "hostPath" in volume:
            folders[name] = Path(volume["hostPath"]["path"])
            continue

        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        folders[name] = folder

        if "secret" in volume or "configMap" in volume:
            kind = "secret" if "secret" in volume else "configMap"
            spec = volume[kind]
            optional = bool(spec.get("optional", False))
            if kind == "secret":
                data = sources.secret(spec.get("secretName", ""), optional=optional)
            else:
                data = sources.config_map(spec.get("name", ""), optional=optional)
            if data is not None:
                default_mode = int(spec.get("defaultMode", DEFAULT_MODE))
                _write_files(folder, data, spec.get("items"), default_mode, name, optional)
        elif "downwardAPI" in volume:
            spec = volume["downwardAPI"]
            default_mode = int(spec.get("defaultMode", DEFAULT_MODE))
            _write_downward_api(folder, pod, spec.get("items") or [], default_mode, name)
        elif "projected" in volume:
            _fill_projected(folder, pod, volume, sources)
        elif "emptyDir" not in volume:
            kinds = ", ".join(key for key in volume if key != "name")
            logger.warning(
                "Volume %s of pod %s/%s is of kind %s, which the test bed kubelet does not "
                "support; the container gets an empty folder instead.",
                name,
                pod["metadata"]["namespace"],
                pod["metadata"]["name"],
                kinds,
            )
    return folders
