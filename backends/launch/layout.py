"""Laying out a Triton backend directory: the Python backend plus our python-based backends.

Triton resolves ``backend: "pd_worker"`` to ``<backend-dir>/pd_worker/model.py`` and runs it
with the Python backend found in ``<backend-dir>/python/`` (libtriton_python.so, the stub,
triton_python_backend_utils.py). The Python backend looks for its stub next to its own
shared library, so those files are copied, not linked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from backends.launch.install import PYTHON_BACKEND_FILES, STUB_NAME, TritonInstall, repo_root

OUR_BACKENDS = ("pd_worker", "pd_orchestrator")


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size \
            and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    shutil.copy2(src, dst)


def layout_backend_dir(install: TritonInstall, dest: Path, source: Path | None = None) -> Path:
    """Fill ``dest`` with ``python/`` and one directory per backend in OUR_BACKENDS.

    ``source`` is the directory holding ``pd_worker/model.py`` etc. (default: this checkout's
    ``backends/``). Idempotent; returns ``dest``. Raises RuntimeError when a model.py is missing.
    """
    src_root = source or repo_root() / "backends"
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in PYTHON_BACKEND_FILES:
        _copy_if_changed(install.python_backend_dir / name, python_dir / name)
    _copy_if_changed(install.stub, python_dir / STUB_NAME)
    (python_dir / STUB_NAME).chmod(0o755)
    for name in OUR_BACKENDS:
        model_py = src_root / name / "model.py"
        if not model_py.is_file():
            raise RuntimeError(f"backend {name!r} has no model.py at {model_py}")
        (dest / name).mkdir(exist_ok=True)
        _copy_if_changed(model_py, dest / name / "model.py")
    return dest
