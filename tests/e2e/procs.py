"""Process checks shared by the e2e tests that start servers as subprocesses."""

from __future__ import annotations

import subprocess


def group_members(pgid: int) -> list[str]:
    """`ps` lines of the processes still in process group ``pgid``."""
    out = subprocess.run(["ps", "-eo", "pid,pgid,comm"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines()[1:] if line.split()[1] == str(pgid)]
