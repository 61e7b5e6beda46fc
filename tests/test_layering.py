"""Import rules from DESIGN.md: one dependency direction, Triton only in backends/serving."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_MODULES = ("triton_python_backend_utils", "tritonclient", "pytriton")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(*parts: str) -> list[Path]:
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in files:
        for name in imported_modules(path):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_engine_imports_neither_triton_nor_kvbridge() -> None:
    files = python_files("backends", "engine")
    assert files, "backends/engine has no modules"
    assert violations(files, (*TRITON_MODULES, "kvbridge", "backends.serving")) == []


def test_kvbridge_never_imports_triton_or_backends() -> None:
    files = python_files("kvbridge")
    assert files, "kvbridge has no modules"
    assert violations(files, (*TRITON_MODULES, "backends")) == []


INDEX_AND_PROTOCOL = ["hashing", "radix", "radix_nodes", "radix_mutation", "radix_types",
                      "eviction", "tiers", "store", "store_tiers", "store_checks", "protocol", "auth",
                      "handle", "master/index", "master/messages", "master/server", "slots"]


@pytest.mark.parametrize("name", INDEX_AND_PROTOCOL)
def test_kvbridge_index_and_protocol_never_import_torch(name: str) -> None:
    path = ROOT / "kvbridge" / f"{name}.py"
    assert path.is_file(), f"kvbridge/{name}.py is missing"
    assert violations([path], ("torch", "numpy")) == []


def test_only_serving_imports_triton_python_backend_utils() -> None:
    serving = ROOT / "backends" / "serving"
    others = [
        p
        for p in python_files("backends") + python_files("kvbridge") + python_files("scripts")
        if serving not in p.parents
    ]
    assert violations(others, ("triton_python_backend_utils",)) == []
