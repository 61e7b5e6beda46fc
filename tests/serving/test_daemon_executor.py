"""DaemonExecutor: results, errors, thread reuse, shutdown, and exit past a call that never returns."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import CancelledError

import pytest

from backends.serving.daemon_executor import DaemonExecutor


def test_results_and_errors_come_back() -> None:
    pool = DaemonExecutor(2, "t")
    try:
        assert pool.submit(divmod, 17, 5).result(5) == (3, 2)
        with pytest.raises(ZeroDivisionError, match="integer division or modulo by zero"):
            pool.submit(divmod, 1, 0).result(5)
    finally:
        pool.shutdown()


def test_an_idle_thread_is_reused_and_threads_are_daemons() -> None:
    pool = DaemonExecutor(4, "reuse")
    try:
        names = [pool.submit(lambda: threading.current_thread().name).result(5) for _ in range(3)]
        daemon = pool.submit(lambda: threading.current_thread().daemon).result(5)
    finally:
        pool.shutdown()
    assert names == ["reuse_0", "reuse_0", "reuse_0"]
    assert daemon is True


def test_calls_beyond_max_threads_queue() -> None:
    pool = DaemonExecutor(1, "one")
    gate = threading.Event()
    try:
        first = pool.submit(gate.wait, 5)
        second = pool.submit(lambda: threading.current_thread().name)
        assert not second.done()
        gate.set()
        assert (first.result(5), second.result(5)) == (True, "one_0")
    finally:
        pool.shutdown()


def test_shutdown_cancels_queued_calls_and_refuses_new_ones() -> None:
    pool = DaemonExecutor(1, "shut")
    gate = threading.Event()
    running = pool.submit(gate.wait, 5)
    queued = pool.submit(int, "7")
    pool.shutdown(cancel_futures=True)
    gate.set()
    assert running.result(5) is True
    with pytest.raises(CancelledError):
        queued.result(5)
    with pytest.raises(RuntimeError, match="^shut: submit after shutdown$"):
        pool.submit(int, "1")


def test_max_threads_below_one_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="^max_threads must be at least 1, got 0$"):
        DaemonExecutor(0, "x")


def test_a_call_that_never_returns_does_not_block_interpreter_exit() -> None:
    code = ("import threading\nfrom backends.serving.daemon_executor import DaemonExecutor\n"
            "pool = DaemonExecutor(2, 'stuck')\npool.submit(threading.Event().wait)\n"
            "pool.shutdown(wait=True)\nprint('exiting')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "exiting\n")


def test_a_written_off_thread_frees_its_place() -> None:
    pool = DaemonExecutor(1, "off")
    stuck = threading.Event()
    try:
        pool.submit(stuck.wait, 5)
        pool.write_off()  # that call is known never to return
        assert pool.submit(lambda: threading.current_thread().name).result(5) == "off_1"
    finally:
        stuck.set()
        pool.shutdown()
