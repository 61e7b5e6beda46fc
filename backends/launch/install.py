"""Finding a tritonserver build and the Python backend pieces it needs.

Search order: an explicit root (``TRITON_PD_TRITONSERVER`` or an argument), ``tritonserver`` on
PATH, ``/opt/tritonserver``, then the build shipped inside the ``nvidia-pytriton`` wheel
(``site-packages/pytriton/tritonserver`` with its libraries in ``nvidia_pytriton.libs`` and one
Python backend stub per Python version under ``python_backend_stubs/<major.minor>``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True, slots=True)
class TritonInstall:
    """A usable tritonserver: the binary, its Python backend, the stub and library dirs.

    ``python_backend_dir`` holds libtriton_python.so and triton_python_backend_utils.py;
    ``stub`` is the triton_python_backend_stub built for the running Python;
    ``lib_dirs`` must be on LD_LIBRARY_PATH of the server (and so of its stubs).
    """

    origin: str  # "explicit" | "path" | "opt" | "pytriton"
    server_bin: Path
    python_backend_dir: Path
    stub: Path
    lib_dirs: tuple[Path, ...]


def python_version_tag() -> str:
    """The running interpreter's ``major.minor``, as the pytriton stub directories name it."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _from_root(root: Path, origin: str) -> TritonInstall | None:
    """A classic install tree: <root>/bin/tritonserver, <root>/backends/python/*, <root>/lib."""
    server_bin = root / "bin" / "tritonserver"
    python_dir = root / "backends" / "python"
    if not server_bin.is_file() or not all((python_dir / f).is_file() for f in PYTHON_BACKEND_FILES):
        return None
    stub = python_dir / STUB_NAME
    wheel_stub = root / "python_backend_stubs" / python_version_tag() / STUB_NAME
    if wheel_stub.is_file():
        stub = wheel_stub
    if not stub.is_file():
        return None
    lib_dirs = tuple(d for d in (root / "lib",) if d.is_dir())
    return TritonInstall(origin, server_bin, python_dir, stub, lib_dirs)


def _pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def _from_pytriton() -> TritonInstall | None:
    root = _pytriton_root()
    if root is None:
        return None
    found = _from_root(root, "pytriton")
    if found is None:
        return None
    libs = root.parent.parent / "nvidia_pytriton.libs"
    lib_dirs = tuple(d for d in (libs, *found.lib_dirs) if d.is_dir())
    return TritonInstall("pytriton", found.server_bin, found.python_backend_dir, found.stub, lib_dirs)


def find_triton(explicit_root: str | None = None) -> TritonInstall:
    """The first usable tritonserver in search order; raises RuntimeError listing what was tried."""
    root = explicit_root or os.environ.get("TRITON_PD_TRITONSERVER")
    tried: list[str] = []
    if root:
        found = _from_root(Path(root), "explicit")
        if found is None:
            raise ValueError(f"TRITON_PD_TRITONSERVER={root!r} is not a tritonserver install "
                             "(needs bin/tritonserver and backends/python/)")
        return found
    on_path = shutil.which("tritonserver")
    if on_path:
        tried.append(on_path)
        found = _from_root(Path(on_path).resolve().parent.parent, "path")
        if found is not None:
            return found
    tried.append("/opt/tritonserver")
    found = _from_root(Path("/opt/tritonserver"), "opt")
    if found is not None:
        return found
    tried.append("pytriton wheel")
    found = _from_pytriton()
    if found is not None:
        return found
    raise RuntimeError(f"no tritonserver found (tried {', '.join(tried)}); "
                       "install nvidia-pytriton or set TRITON_PD_TRITONSERVER")


def python_lib_dir() -> Path | None:
    """Directory of the running interpreter's libpython, so the stub embeds this Python."""
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlib and (Path(libdir) / ldlib).exists():
        return Path(libdir)
    return None


def repo_root() -> Path:
    """The directory that holds the ``backends`` and ``kvbridge`` packages."""
    return Path(__file__).resolve().parent.parent.parent
