"""A real etcd (Debian's etcd-server) for tests: one member on free loopback ports with a
temporary data dir; ``close()`` stops it and removes the dir. Tests skip when the binary is
missing (scripts/test.sh installs it where apt-get can)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable

import pytest

ETCD_BINARY = shutil.which("etcd")
START_TIMEOUT_S = 30.0


def require_etcd() -> str:
    if ETCD_BINARY is None:
        pytest.skip("the etcd binary is not installed (Debian package etcd-server; scripts/test.sh "
                    "installs it where apt-get is available)")
    try:
        import etcd3gw  # noqa: F401
    except ImportError:
        pytest.skip("the etcd3gw package is not installed (pip install -e '.[test]')")
    return ETCD_BINARY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminates ``proc`` (SIGCONT first, in case a test stopped it), SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` held; fails the test naming ``what`` after ``timeout_s``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, f"{what} within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


class EtcdServer:
    """See the module docstring. ``endpoint`` is "127.0.0.1:<client port>"."""

    def __init__(self) -> None:
        binary = require_etcd()
        self.data_dir = tempfile.mkdtemp(prefix="kvb-etcd-")
        client, peer = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{client}"
        self.log = open(f"{self.data_dir}/etcd.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [binary, "--name", "kvb-test", "--data-dir", f"{self.data_dir}/data",
             "--listen-client-urls", f"http://{self.endpoint}", "--advertise-client-urls", f"http://{self.endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"kvb-test=http://127.0.0.1:{peer}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            try:
                with direct.open(f"http://{self.endpoint}/health", timeout=1.0) as reply:
                    if b'"true"' in reply.read():
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(f"{self.data_dir}/etcd.log", "rb") as log:
                    tail = log.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"etcd on {self.endpoint} did not start (exit status {self.proc.poll()}); "
                                   f"its log ends:\n{tail}")
            time.sleep(0.1)

    def close(self) -> None:
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
