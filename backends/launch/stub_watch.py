"""Bringing back a model whose stub process died, through Triton's model-control API (issue 8).

python_backend 2.51 restarts no decoupled stub (every pd model is decoupled): after a stub dies
tritonserver keeps its model READY, sends new requests to it (they fail after 1-2 s with "Stub
process '<instance>' is not healthy."), never answers the requests it had in flight, and leaves
the stub's /dev/shm region behind. So the launcher starts tritonserver with explicit model
control (``MODEL_CONTROL_ARGS``: every model loaded at start, as in the default mode) and runs a
StubWatcher beside it. Every ``interval_s`` it lists the server's stubs (shm_cleanup.stubs);
when one it saw is gone, it reloads that stub's model:

1. ``unload``: from then on ``/v2/health/ready`` and ``/v2/models/<model>/ready`` answer 400,
   which is what a load balancer sees, until the model is back;
2. unlink what the dead stub left in /dev/shm (its python_backend region, its kvbridge pool);
3. ``load``, retried every ``retry_s`` while it fails; ready again when it returns.

The orchestrators meanwhile plan around the dead worker (worker_health.py) and plan on it again
once it answers. Nothing is done while the server itself is not running (it is stopping, or
it died: the launcher handles that). ``close()`` stops the thread (call it before stopping the
server, whose stubs then exit on purpose); every HTTP call has a deadline.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from backends.launch.shm_cleanup import Stub, dead_stub_leftovers, stubs, unlink

MODEL_CONTROL_ARGS = ("--model-control-mode=explicit", "--load-model=*")


class ModelControl:
    """Triton's HTTP model-control API (``/v2/repository/models/<model>/load|unload``)."""

    def __init__(self, http_url: str, load_timeout_s: float = 600.0, unload_timeout_s: float = 60.0) -> None:
        self.http_url = http_url
        self.load_timeout_s = load_timeout_s
        self.unload_timeout_s = unload_timeout_s

    def load(self, model: str) -> None:
        """Returns once ``model`` is loaded; RuntimeError with the server's message otherwise."""
        self._post(f"/v2/repository/models/{model}/load", self.load_timeout_s)

    def unload(self, model: str) -> None:
        self._post(f"/v2/repository/models/{model}/unload", self.unload_timeout_s)

    def _post(self, path: str, timeout_s: float) -> None:
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                return
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            try:
                message = str(json.loads(body).get("error", body))
            except ValueError:
                message = body
            raise RuntimeError(f"POST {path}: {exc.code} {message}") from None
        except OSError as exc:
            raise RuntimeError(f"POST {path}: {exc}") from None


class StubWatcher:
    """See the module docstring. ``report`` gets one line per event (stub died, model back,
    load failed); ``recoveries`` lists (model, seconds from noticing to loaded)."""

    def __init__(self, pgid: int, control: ModelControl, server_running: Callable[[], bool],
                 report: Callable[[str], None], interval_s: float = 0.5, retry_s: float = 5.0) -> None:
        if interval_s <= 0 or retry_s <= 0:
            raise ValueError(f"interval_s/retry_s: expected > 0, got {interval_s}/{retry_s}")
        self._pgid = pgid
        self._control = control
        self._server_running = server_running
        self._report = report
        self._interval_s = interval_s
        self._retry_s = retry_s
        self._stop = threading.Event()
        self.recoveries: list[tuple[str, float]] = []
        self._known = {s.pid: s for s in stubs(pgid)}
        self._thread = threading.Thread(target=self._run, name="pd-stub-watch", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops watching; a reload in progress stops at its next step (a load call in flight
        runs to its own deadline, ``load_timeout_s``)."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            if not self._server_running():
                continue
            live = {s.pid: s for s in stubs(self._pgid)}
            dead: dict[str, list[Stub]] = {}
            for pid, stub in self._known.items():
                if pid not in live:
                    dead.setdefault(stub.model, []).append(stub)
            for model, gone in dead.items():
                if self._stop.is_set() or not self._server_running():
                    break
                self._recover(model, gone)
            self._known = {s.pid: s for s in stubs(self._pgid)}

    def _recover(self, model: str, gone: list[Stub]) -> None:
        start = time.monotonic()
        pids = ", ".join(str(s.pid) for s in gone)
        self._report(f"triton-pd: the {model} model's process (pid {pids}) died; reloading {model} "
                     "(the server reports not ready until it is back)")
        try:
            self._control.unload(model)
        except RuntimeError as exc:
            self._report(f"triton-pd: unloading {model} failed: {exc}")
        for stub in gone:
            unlink(dead_stub_leftovers(self._pgid, stub))
        while not self._stop.is_set() and self._server_running():
            try:
                self._control.load(model)
            except RuntimeError as exc:
                self._report(f"triton-pd: loading {model} failed ({exc}); retrying in {self._retry_s:g} s")
                self._stop.wait(self._retry_s)
                continue
            elapsed = time.monotonic() - start
            self.recoveries.append((model, elapsed))
            self._report(f"triton-pd: {model} is back after {elapsed:.1f} s")
            return
