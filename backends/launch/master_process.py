"""The kvbridge master as a process of its own, restarted when it dies (issue 8).

``triton-pd serve`` used to run the master as a thread in the launcher: if it failed, nothing
brought it back. ``MasterProcess.start_if_needed`` (unless KVBRIDGE_MASTER names a master)
picks a loopback port, exports KVBRIDGE_MASTER for tritonserver's models, and runs
``python -m backends.launch.master_process PORT HEARTBEAT_TIMEOUT_S`` in its own session (a
terminal's Ctrl-C is for the launcher) with PR_SET_PDEATHSIG (it never outlives the launcher).
A watch thread restarts it on the same port whenever it exits, every ``RESTART_S`` at most.
The workers' MasterClients reconnect by themselves and, told ``unknown_node`` by the new
master, register again and re-publish what they hold (kvbridge/master/client.py, link.py).
With KVBRIDGE_ETCD naming an etcd on this host, the master is one candidate of the election
(kvbridge/master/election.py): each server's master campaigns, one leads, and the workers of
every server follow the leader that etcd names. An etcd beyond this host needs masters that
other hosts reach (`triton-pd master --etcd ... --advertise ...`) named by KVBRIDGE_MASTER:
``start_if_needed`` refuses (ValueError) to start a loopback one then. ``close()`` stops the thread, then the master (SIGTERM,
then SIGKILL after a grace period). Every wait has a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from backends.launch.launcher import free_ports, parent_death_signal
from backends.serving.kv_master import MASTER_ENV, master_address
from kvbridge import EtcdConfig

ETCD_ENV = "KVBRIDGE_ETCD"

RESTART_S = 1.0
START_TIMEOUT_S = 20.0


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class MasterProcess:
    """See the module docstring. ``restarts`` counts the restarts so far."""

    def __init__(self, port: int, heartbeat_timeout_s: float, report: Callable[[str], None]) -> None:
        self.port = port
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._report = report
        self._stop = threading.Event()
        self.restarts = 0
        self._proc = self._spawn()
        self._thread = threading.Thread(target=self._watch, name="pd-master-watch", daemon=True)
        self._thread.start()

    @classmethod
    def start_if_needed(cls, report: Callable[[str], None],
                        heartbeat_timeout_s: float = 10.0) -> MasterProcess | None:
        if master_address() is not None:
            return None
        etcd = EtcdConfig.from_env()
        if etcd is not None and not etcd.on_loopback:
            raise ValueError(
                f"{ETCD_ENV} names an etcd beyond this host ({etcd.describe()}) and {MASTER_ENV} is unset: "
                f"a master started here would listen on loopback only. Start masters with `triton-pd master "
                f"--etcd {etcd.describe()} --host <ip> --advertise <ip>:<port> --token ...` and set "
                f"{MASTER_ENV} to one of them (and KVBRIDGE_TOKEN) for every server")
        [port] = free_ports(1)
        master = cls(port, heartbeat_timeout_s, report)
        os.environ[MASTER_ENV] = f"127.0.0.1:{port}"
        return master

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backends.launch.master_process", str(self.port),
             str(self._heartbeat_timeout_s)], stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=parent_death_signal(os.getpid()))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepting(self.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(f"kvbridge master on 127.0.0.1:{self.port} did not start "
                                   f"(exit status {proc.returncode})")
            time.sleep(0.05)
        etcd = EtcdConfig.from_env()
        role = f" (a candidate for the lead in etcd {etcd.describe()})" if etcd is not None else ""
        self._report(f"triton-pd: kvbridge master (pid {proc.pid}) on 127.0.0.1:{self.port}{role}")
        return proc

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            code = self._proc.poll()
            if code is None:
                continue
            self._report(f"triton-pd: kvbridge master (pid {self._proc.pid}) exited with status "
                         f"{code}; restarting it")
            try:
                self._proc = self._spawn()
                self.restarts += 1
            except (RuntimeError, OSError) as exc:
                self._report(f"triton-pd: restarting the kvbridge master failed ({exc}); retrying")
                self._stop.wait(RESTART_S)

    def close(self, grace_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(START_TIMEOUT_S + 5.0)
        _stop(self._proc, grace_s)


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def main(argv: list[str]) -> int:
    """The master process: serves until SIGTERM (with KVBRIDGE_ETCD: campaigns for the lead)."""
    from kvbridge import MasterConfig, MasterThread

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    master = MasterThread(MasterConfig(port=int(argv[1]), heartbeat_timeout_s=float(argv[2]),
                                       etcd=EtcdConfig.from_env()))
    try:
        while not stop.wait(1.0):
            pass
    finally:
        master.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
