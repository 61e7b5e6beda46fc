"""Import rules from DESIGN.md: one dependency direction, Triton only in backends/serving, and
the launch tools (backends/launch) outside everything that runs inside tritonserver."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_MODULES = ("triton_python_backend_utils", "tritonclient", "pytriton")
# What runs outside tritonserver: the launch tools, the `triton-pd` command, the OpenAI front door.
LAUNCH_SIDE = ("backends.launch", "backends.cli", "backends.openai_api")
# The python-based backends tritonserver loads: everything they import runs inside it.
TRITON_ENTRY_POINTS = ("backends.pd_orchestrator.model", "backends.pd_worker.model")


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


def test_engine_imports_neither_triton_nor_kvbridge_nor_serving_nor_launch() -> None:
    files = python_files("backends", "engine")
    assert files, "backends/engine has no modules"
    assert violations(files, (*TRITON_MODULES, "kvbridge", "backends.serving", *LAUNCH_SIDE)) == []


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the two packages by dotted name."""
    return {module_name(p): p for p in python_files("backends") + python_files("kvbridge")
            if "python" not in p.relative_to(ROOT).parts[1:2]}


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``path`` may import: import statements anywhere in the file (function-level
    and relative ones included) and ``importlib.import_module("...")`` with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def triton_side_modules() -> set[str]:
    """The project modules reachable from the Triton entry points (each with its packages)."""
    modules = project_modules()
    seen: set[str] = set()
    todo = list(TRITON_ENTRY_POINTS)
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        for imported in imports_of(name, modules[name]):
            while imported and imported not in modules:  # `from pkg.mod import name`
                imported = imported.rpartition(".")[0]
            todo.append(imported)
    return seen


def test_nothing_inside_tritonserver_imports_the_launch_tools() -> None:
    inside = triton_side_modules()
    # the walk reaches both sides of the server: a broken walk would pass vacuously
    for name in (*TRITON_ENTRY_POINTS, "backends.serving.orchestrator_model",
                 "backends.serving.worker_model", "backends.serving.engine_spec",
                 "backends.engine.engine", "kvbridge.handle"):
        assert name in inside, f"{name} is not reached from the Triton entry points"
    launch = sorted(m for m in inside if any(m == s or m.startswith(s + ".") for s in LAUNCH_SIDE))
    assert launch == []


def test_serving_and_the_backend_entries_never_import_the_launch_tools() -> None:
    files = python_files("backends", "serving") + [
        ROOT / "backends" / entry.split(".")[1] / "model.py" for entry in TRITON_ENTRY_POINTS]
    assert violations(files, LAUNCH_SIDE) == []


def kvbridge_imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """Every import of kvbridge in ``path`` (function-level ones and literal
    ``importlib.import_module`` names included) as (module, names imported from it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names if alias.name.split(".")[0] == "kvbridge"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "kvbridge":
            found.append((node.module, tuple(alias.name for alias in node.names)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and node.args[0].value.split(".")[0] == "kvbridge"):
            found.append((node.args[0].value, ()))
    return found


def test_backends_import_only_kvbridge_public_names() -> None:
    """Serving (and everything else under backends/) reaches kvbridge through its front door:
    ``from kvbridge import <name>`` with a name ``kvbridge.__all__`` exports, never a submodule."""
    import kvbridge

    public = set(kvbridge.__all__)
    assert {"KVNode", "KVNodeConfig", "MasterClient"} <= public
    used: set[str] = set()
    bad = []
    for path in python_files("backends"):
        for module, names in kvbridge_imports(path):
            where = path.relative_to(ROOT)
            if module != "kvbridge":
                bad.append(f"{where} imports {module}")
            elif not names:
                bad.append(f"{where} imports kvbridge as a module (use from kvbridge import <name>)")
            else:
                bad += [f"{where} imports kvbridge.{n}, not a public name" for n in names if n not in public]
                used.update(names)
    assert bad == []
    assert {"KVNode", "KVNodeConfig", "MasterClient"} <= used  # the walk saw serving's imports


def test_kvbridge_public_names_resolve() -> None:
    import kvbridge

    missing = [name for name in kvbridge.__all__ if getattr(kvbridge, name, None) is None]
    assert missing == []


def test_optional_transports_are_reached_only_through_the_registry() -> None:
    """nixl and deepep (optional packages) are imported inside kvbridge only by the transport
    registry (and by their own modules); the node opens its transports through it too."""
    optional = ("kvbridge.transport.nixl", "kvbridge.transport.deepep")
    transport = ROOT / "kvbridge" / "transport"
    others = [p for p in python_files("kvbridge") + python_files("backends")
              if not (p.parent == transport and p.stem.startswith(("nixl", "deepep", "registry")))]
    bad = sorted(f"{p.relative_to(ROOT)} imports {name}" for p in others
                 for name in imports_of(module_name(p), p)
                 if any(name == o or name.startswith(o + "_") or name.startswith(o + ".") for o in optional))
    assert bad == []
    node = imports_of("kvbridge.node", ROOT / "kvbridge" / "node.py")
    assert "kvbridge.transport.registry.open_transport" in node


def test_kvbridge_never_imports_triton_or_backends() -> None:
    files = python_files("kvbridge")
    assert files, "kvbridge has no modules"
    assert violations(files, (*TRITON_MODULES, "backends")) == []


INDEX_AND_PROTOCOL = ["hashing", "radix",
                      "eviction", "tiers", "store", "protocol", "auth",
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
