"""A watchdog process that cleans up after a launcher that died (issue 8).

``triton-pd serve`` starts tritonserver with PR_SET_PDEATHSIG (launcher.py), so a killed
launcher's server gets SIGTERM. That is not enough on its own: a stub can deadlock in its
finalize once its server is gone (python_backend 2.51: the stub-to-parent thread blocks
sending to the dead parent while holding the lock that the stub's parent-death check needs),
and nobody would then unlink the stubs' /dev/shm regions and kvbridge pools.

The guard is a separate process in its own session, so the signals that stop the launcher's
process group do not reach it. Its stdin is a pipe whose write end only the launcher holds: end
of file means the launcher is gone, whether it closed the pipe (a clean stop) or died (SIGKILL
included). Until then it records the stub regions of the server's process group every
``SCAN_S``. Then: if any process of the group is left, SIGTERM to the group, ``GRACE_S`` to go,
SIGKILL; once the group is gone, unlink what is left in /dev/shm (shm_cleanup.py). It never
signals anything but that group. Launcher side: ``Guard.start(pgid)``; ``close()`` after the
server was stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

from backends.launch.shm_cleanup import live_members, stub_regions, unlink_leftovers

SCAN_S = 1.0
GRACE_S = 15.0


class Guard:
    """The launcher's handle on its guard process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    @classmethod
    def start(cls, pgid: int) -> Guard:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backends.launch.guard", str(pgid)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self, timeout_s: float = GRACE_S + 15.0) -> None:
        """Tells the guard the launcher is done (the server must be stopped by now) and waits
        for it to check and exit."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5.0)


def _group_alive(pgid: int) -> bool:
    return bool(live_members(pgid))


def _wait_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.1)
    return not _group_alive(pgid)


def guard(pgid: int, launcher_gone: threading.Event) -> list[str]:
    """Records group ``pgid``'s stub regions until ``launcher_gone``, then stops the group if
    it is still there and unlinks its leftovers. Returns what it removed (paths)."""
    regions: set[str] = set()
    while not launcher_gone.wait(SCAN_S):
        regions.update(stub_regions(pgid))
    regions.update(stub_regions(pgid))
    if _group_alive(pgid):
        print(f"triton-pd guard: the launcher is gone and tritonserver (pid {pgid}) is still "
              "running; stopping it", file=sys.stderr, flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        if not _wait_gone(pgid, GRACE_S):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            _wait_gone(pgid, 10.0)
    if _group_alive(pgid):
        return []  # something survived SIGKILL: its regions may still be mapped
    return [str(p) for p in unlink_leftovers(pgid, sorted(regions))]


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the launcher
    pgid = int(argv[1])
    gone = threading.Event()

    def watch_stdin() -> None:
        with contextlib.suppress(OSError):
            sys.stdin.buffer.read()
        gone.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    removed = guard(pgid, gone)
    if removed:
        print(f"triton-pd guard: removed {len(removed)} shared-memory leftovers of tritonserver "
              f"(pid {pgid})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
