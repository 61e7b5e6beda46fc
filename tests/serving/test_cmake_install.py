"""``cmake --install`` lays the backends and the model repository out as a Triton install tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backends.launch.install import repo_root

ROOT = repo_root()
REPOSITORY_FILES = [
    "models/decode/1/engine.yaml", "models/decode/config.pbtxt",
    "models/ensemble/1/.keep", "models/ensemble/config.pbtxt",
    "models/llm/1/.keep", "models/llm/config.pbtxt",
    "models/prefill/1/engine.yaml", "models/prefill/config.pbtxt",
]
BACKEND_FILES = ["backends/pd_orchestrator/model.py", "backends/pd_worker/model.py"]


def _package_sources(package: str) -> list[str]:
    """Every Python source of ``package`` in this checkout, as the install should place it."""
    src = ROOT / package
    out = []
    for path in src.rglob("*.py"):
        rel = path.relative_to(ROOT)
        skipped_dir = package == "backends" and (rel.parts[1] == "python" or rel.parts[1].startswith("pd_"))
        if "__pycache__" in rel.parts or skipped_dir:
            continue
        out.append(f"backends/triton_pd/{rel.as_posix()}")
    return out


def _installed(prefix: Path) -> list[str]:
    return sorted(p.relative_to(prefix).as_posix() for p in prefix.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed (apt-get install -y cmake)")
    tmp = tmp_path_factory.mktemp("cmake")
    build, prefix = tmp / "build", tmp / "prefix"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_INSTALL_PREFIX={prefix}"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--install", str(build)], check=True, capture_output=True, text=True)
    return prefix


def test_install_places_backends_packages_and_repository(prefix: Path) -> None:
    expected = sorted(BACKEND_FILES + REPOSITORY_FILES + _package_sources("backends")
                      + _package_sources("kvbridge"))
    assert _installed(prefix) == expected
    for name in ("backends/pd_worker/model.py", "models/llm/config.pbtxt", "models/prefill/1/engine.yaml"):
        source = ROOT / (name.replace("models/", "model_repository/", 1))
        assert (prefix / name).read_bytes() == source.read_bytes(), name


def test_installed_packages_import_from_the_prefix(prefix: Path, tmp_path: Path) -> None:
    python_dir = prefix / "backends" / "triton_pd"
    env = {**os.environ, "PYTHONPATH": str(python_dir)}
    code = ("import backends.serving.orchestrator, backends.launch.deploy, backends.engine.engine, "
            "kvbridge.handle; print(backends.launch.deploy.__file__); print(kvbridge.handle.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(python_dir / "backends/launch/deploy.py"), str(python_dir / "kvbridge/handle.py")]
