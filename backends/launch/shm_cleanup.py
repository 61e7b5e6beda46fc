"""What a stopped tritonserver's process group may leave in /dev/shm, and its removal.

A stub that finalizes unlinks its own shared memory: python_backend's region (the stub's
second command-line argument) and, for pd_worker, its kvbridge pool (named with the server's
process group, see kvbridge.node.pool_name). A stub killed at shutdown (the server's exit timeout
ran out, e.g. while a client held an HTTP keep-alive connection) leaves them behind. The
launcher collects the region names while the stubs live and, once the whole group is gone,
unlinks whatever is left: no live process can map them any more. A stub that dies while the
server runs leaves the same two (``dead_stub_leftovers``): the stub watcher unlinks them when
it reloads that model (stub_watch.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

SHM_DIR = Path("/dev/shm")
STUB_NAME = "triton_python_backend_stub"


def _pgid_of(pid_dir: Path) -> int | None:
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[2]) if len(fields) > 2 else None


def live_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that are not zombies (a zombie maps nothing any more;
    it is gone but for its exit status, which its parent may never collect)."""
    pids = []
    for pid_dir in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            stat = (pid_dir / "stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                pids.append(int(pid_dir.name))
    return sorted(pids)


class Stub(NamedTuple):
    """One python_backend stub process: its model (from the model file's path,
    ``<repository>/<model>/<version>/model.py``) and its shared-memory region."""

    pid: int
    model: str
    region: str


def stubs(pgid: int) -> list[Stub]:
    """Every live stub of group ``pgid`` (zombies, whose command line is empty, excluded)."""
    found = []
    for pid_dir in Path("/proc").glob("[0-9]*"):
        if _pgid_of(pid_dir) != pgid:
            continue
        with contextlib.suppress(OSError, UnicodeDecodeError):
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 2 and os.path.basename(argv[0].decode()) == STUB_NAME:
                model = Path(argv[1].decode()).parent.parent.name
                found.append(Stub(int(pid_dir.name), model, argv[2].decode()))
    return sorted(found)


def stub_regions(pgid: int) -> list[str]:
    """The python_backend shared-memory region of every stub now running in group ``pgid``."""
    return sorted(s.region for s in stubs(pgid))


def dead_stub_leftovers(pgid: int, stub: Stub) -> list[Path]:
    """What the dead ``stub`` of group ``pgid`` left: its python_backend region (python_backend
    does not remove it, not even when the model is reloaded) and its kvbridge pool."""
    names = set(SHM_DIR.glob(f"kvb-*pool-g{pgid}-p{stub.pid}-*"))
    if "/" not in stub.region and (SHM_DIR / stub.region).exists():
        names.add(SHM_DIR / stub.region)
    return sorted(names)


def unlink(paths: list[Path]) -> list[Path]:
    """Unlinks ``paths``; returns those it removed."""
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def leftovers(pgid: int, regions: list[str]) -> list[Path]:
    """Which of ``regions`` and of group ``pgid``'s kvbridge pools (and their control tables)
    still exist."""
    names = {p for p in SHM_DIR.glob(f"kvb-*pool-g{pgid}-*")}
    names.update(SHM_DIR / r for r in regions if "/" not in r and (SHM_DIR / r).exists())
    return sorted(names)


def unlink_leftovers(pgid: int, regions: list[str]) -> list[Path]:
    """Unlinks ``leftovers(pgid, regions)``; call only once no process of ``pgid`` is left.
    Returns what it removed."""
    return unlink(leftovers(pgid, regions))
