"""The layering rules: the core stays free of the web and operator frameworks.

import-linter cannot check this layout, because its graph builder only
accepts top-level packages and ``secapi.core``, ``secapi.api`` and
``secapi.operator`` live in folders of their own; so this test reads every
import statement with ``ast`` instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer folder -> module prefixes its code must never import.
FORBIDDEN = {
    "core": ("fastapi", "starlette", "kopf", "secapi.api", "secapi.operator", "secapi.cli"),
    "api": ("kopf", "secapi.operator"),
    "operator": ("fastapi", "starlette", "secapi.api"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations(layer: str) -> list[str]:
    problems = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            for prefix in FORBIDDEN[layer]:
                if module == prefix or module.startswith(prefix + "."):
                    problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return problems


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    assert violations(layer) == []


def test_layer_check_catches_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom kopf import on\nimport secapi.api.app\n")

    modules = [module for _, module in imported_modules(sample)]

    assert "kopf" in modules
    assert "secapi.api.app" in modules
