"""Running the front door: uvicorn over ``create_app`` on one event loop with its ``TritonLlm``.

``run`` serves in the calling thread until SIGINT/SIGTERM (``triton-pd openai``);
``FrontDoor`` serves on a thread of its own, owned by ``triton-pd serve``, and stops on
``close()``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn

Note = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class FrontDoorConfig:
    grpc_url: str  # tritonserver's gRPC endpoint, host:port
    model: str = "llm"
    host: str = "127.0.0.1"
    port: int = 9000
    connect_timeout_s: float = 60.0
    request_timeout_s: float = 600.0


def check_port_free(host: str, port: int, option: str) -> None:
    """ValueError naming ``option`` when ``host:port`` is already bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(f"{option} {port}: {host}:{port} is already in use ({exc.strerror}); "
                             f"stop what holds it or choose another {option}") from None


async def _serve(config: FrontDoorConfig, listening: Callable[[uvicorn.Server], None]) -> None:
    """Connects to ``llm``, then serves until the server is told to exit; ``listening`` is
    called once uvicorn has bound its socket."""
    import uvicorn

    from backends.openai_api.app import create_app
    from backends.openai_api.triton import TritonLlm

    llm = await TritonLlm.connect(config.grpc_url, config.model, config.connect_timeout_s,
                                  config.request_timeout_s)
    try:
        server = uvicorn.Server(uvicorn.Config(create_app(llm), host=config.host, port=config.port,
                                               log_level="warning", lifespan="off"))
        serving = asyncio.ensure_future(server.serve())
        while not server.started and not serving.done():
            await asyncio.wait({serving}, timeout=0.02)
        if server.started:
            listening(server)
        await serving
    finally:
        await llm.close()


def run(config: FrontDoorConfig, note: Note) -> None:
    """Serves until SIGINT or SIGTERM; ConnectionError when the model is not ready in time."""
    check_port_free(config.host, config.port, "--port")
    asyncio.run(_serve(config, lambda _: note(_listening(config))))


def _listening(config: FrontDoorConfig) -> str:
    return (f"OpenAI API on http://{config.host}:{config.port}/v1 (model {config.model!r} at "
            f"{config.grpc_url})")


class FrontDoor:
    """The front door on its own thread. ``start`` returns once it listens (or raises why it
    cannot); ``close`` stops it, waiting for in-flight requests up to uvicorn's own shutdown."""

    def __init__(self, config: FrontDoorConfig) -> None:
        self.config = config
        self._server: uvicorn.Server | None = None
        self._ended = threading.Event()
        self._listening = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="openai-front-door", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(_serve(self.config, self._set_server))
        except BaseException as exc:  # reported by start(), or lost after close()
            self._failure = exc
        finally:
            self._ended.set()

    def _set_server(self, server: uvicorn.Server) -> None:
        self._server = server
        self._listening.set()

    def start(self, timeout_s: float) -> str:
        """Starts serving; a line saying where. ValueError / ConnectionError / RuntimeError."""
        check_port_free(self.config.host, self.config.port, "--openai-port")
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._ended.wait(0.05) and time.monotonic() < deadline:
            if self._listening.is_set():
                return _listening(self.config)
        if self._failure is not None:
            raise self._failure
        raise RuntimeError(f"the OpenAI front door did not start within {timeout_s:g} s")

    def close(self, timeout_s: float = 30.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
