"""perf_analyzer, Triton's C++ load generator (and genai-perf's engine), set up from package registries.

The binary ships inside the PyPI wheel ``tritonclient==2.48.0`` (``data/bin/perf_analyzer``;
later wheels dropped it). It links ``libb64.so.0d`` (Debian ``libb64-0d``) and
``libcudart.so.12`` (PyPI ``nvidia-cuda-runtime-cu12``, a test dependency of triton-pd; the CPU
runs need only the library, not a GPU). ``install()`` puts it under ``cache_root()/perf_analyzer``:
the wheel through ``pip download`` (only the binary is kept: the 2.48 client library would
downgrade the installed one), libb64 from the system when the loader knows it, else through
``apt-get download`` + ``dpkg -x`` (no root needed once apt's package lists exist). It then
writes ``envs/<this Python environment>/bin/perf_analyzer``, a wrapper that sets LD_LIBRARY_PATH
(libcudart lives in this environment's site-packages, so each environment has its own wrapper:
a shared one pointed into whichever virtual environment installed last, and broke when CI
removed it), so that genai-perf (which runs ``perf_analyzer`` from PATH) finds it through
``PerfAnalyzer.env()``. ``find()`` reads what ``install()`` left for this environment; nothing
here runs inside tritonserver.

    python3 -m backends.launch.perf_analyzer install   # what scripts/test.sh runs
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from backends.engine.gguf_loader import cache_root

WHEEL = "tritonclient==2.48.0"
WHEEL_BINARY = "tritonclient-2.48.0.data/data/bin/perf_analyzer"
LIBB64 = "libb64.so.0d"
LIBB64_DEB = "libb64-0d"
INSTALL_TIMEOUT_S = 600


@dataclass(frozen=True, slots=True)
class PerfAnalyzer:
    """An installed perf_analyzer: ``bin_dir/perf_analyzer`` is the wrapper to run."""

    bin_dir: Path

    @property
    def path(self) -> Path:
        return self.bin_dir / "perf_analyzer"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with ``bin_dir`` first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env


def home() -> Path:
    return cache_root() / "perf_analyzer"


def env_bin_dir() -> Path:
    """Where this Python environment's wrapper goes (keyed by ``sys.prefix``)."""
    key = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:16]
    return home() / "envs" / key / "bin"


def find() -> PerfAnalyzer | None:
    """The perf_analyzer installed for this Python environment, or None when ``install()`` has
    not run here (or did not finish)."""
    tool = PerfAnalyzer(env_bin_dir())
    return tool if os.access(tool.path, os.X_OK) else None


def cudart_dir() -> Path:
    """The directory of libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel."""
    try:
        import nvidia.cuda_runtime as cuda_runtime
    except ImportError as exc:
        raise RuntimeError("nvidia-cuda-runtime-cu12 is not installed (pip install -e '.[test]')") from exc
    lib = Path(next(iter(cuda_runtime.__path__))) / "lib"
    if not (lib / "libcudart.so.12").is_file():
        raise RuntimeError(f"libcudart.so.12 not found in {lib}")
    return lib


def _system_has(library: str) -> bool:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    return f"{library} " in out


def _libb64_dir(dest: Path) -> Path | None:
    """A directory holding libb64.so.0d, or None when the system's loader already finds it."""
    if _system_has(LIBB64):
        return None
    lib = dest / "usr" / "lib" / "x86_64-linux-gnu"
    if (lib / LIBB64).is_file():
        return lib
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", LIBB64_DEB], cwd=tmp, capture_output=True, text=True,
                             timeout=INSTALL_TIMEOUT_S, check=False)
        if got.returncode != 0 and os.geteuid() == 0:  # no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=INSTALL_TIMEOUT_S, check=False)
            got = subprocess.run(["apt-get", "download", LIBB64_DEB], cwd=tmp, capture_output=True, text=True,
                                 timeout=INSTALL_TIMEOUT_S, check=False)
        debs = sorted(Path(tmp).glob(f"{LIBB64_DEB}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {LIBB64_DEB} failed: {got.stderr.strip()}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(dest)], check=True, timeout=INSTALL_TIMEOUT_S)
    if not (lib / LIBB64).is_file():
        raise RuntimeError(f"{LIBB64_DEB} did not contain {lib / LIBB64}")
    return lib


def _binary(dest: Path) -> Path:
    binary = dest / "perf_analyzer.bin"
    if binary.is_file():
        return binary
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
                       check=True, timeout=INSTALL_TIMEOUT_S)
        [wheel] = Path(tmp).glob("tritonclient-*.whl")
        with zipfile.ZipFile(wheel) as z, z.open(WHEEL_BINARY) as src, open(f"{binary}.part", "wb") as out:
            shutil.copyfileobj(src, out)
    os.chmod(f"{binary}.part", 0o755)
    os.replace(f"{binary}.part", binary)
    return binary


def install() -> PerfAnalyzer:
    """Sets perf_analyzer up under ``home()`` (idempotent: what is there is reused) and checks
    that it starts. Raises RuntimeError (or CalledProcessError) saying what is missing."""
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    binary = _binary(root)
    lib_dirs = [d for d in (_libb64_dir(root / "libb64"), cudart_dir()) if d is not None]
    tool = PerfAnalyzer(env_bin_dir())
    tool.bin_dir.mkdir(parents=True, exist_ok=True)
    libs = os.pathsep.join(str(d) for d in lib_dirs)
    wrapper = f'#!/bin/sh\nLD_LIBRARY_PATH="{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" exec "{binary}" "$@"\n'
    tool.path.with_suffix(".part").write_text(wrapper)
    os.chmod(tool.path.with_suffix(".part"), 0o755)
    os.replace(tool.path.with_suffix(".part"), tool.path)
    version = subprocess.run([str(tool.path), "--version"], capture_output=True, text=True, timeout=60, check=False)
    if version.returncode != 0:
        raise RuntimeError(f"{tool.path} does not start: {(version.stdout + version.stderr).strip()}")
    return tool


def main(argv: list[str]) -> int:
    if argv != ["install"]:
        print("usage: python3 -m backends.launch.perf_analyzer install", file=sys.stderr)
        return 2
    tool = install()
    print(f"perf_analyzer: {tool.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
