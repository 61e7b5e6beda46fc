"""``triton-pd serve``, ``triton-pd doctor`` and ``triton-pd build-repo``."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from backends.launch import demo
from backends.launch.deploy import DEFAULT_MODEL, Deployment, load_deployment, write_repository
from backends.launch.guard import Guard
from backends.launch.install import find_triton, python_version_tag, repo_root
from backends.launch.launcher import LaunchSpec, ServerPorts, TritonServer
from backends.launch.layout import layout_backend_dir
from backends.launch.master_process import MasterProcess
from backends.launch.startup import (
    Note,
    ServerLog,
    StartupError,
    check_ports_free,
    prepare_sources,
    repository_plan,
    timed_note,
    wait_ready,
)
from backends.launch.stub_watch import MODEL_CONTROL_ARGS, ModelControl, StubWatcher

if TYPE_CHECKING:
    from backends.openai_api.server import FrontDoor

# What doctor reports, and the modules that provide it (the nixl meta package or a build wheel).
OPTIONAL = {"torch": ("torch",), "flash_mla": ("flash_mla",), "deep_ep": ("deep_ep",),
            "nixl": ("nixl", "nixl_cu13", "nixl_cu12"), "tensorrt_llm": ("tensorrt_llm",),
            "triton": ("triton",), "tritonclient": ("tritonclient",)}


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="start tritonserver with the pd backends and serve a model repository "
        "until Ctrl-C", description="Start tritonserver with the pd backends (and a kvbridge "
        "master unless KVBRIDGE_MASTER names one) and serve until Ctrl-C or SIGTERM.")
    serve.add_argument("--model-repository", type=Path, default=None,
                       help="model repository to serve (default: the shipped model_repository/: "
                       f"{DEFAULT_MODEL}, 1 prefill + 1 decode worker)")
    serve.add_argument("--config", type=Path, default=None,
                       help="deployment YAML; a repository is generated from it (see README)")
    serve.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: %(default)s)")
    serve.add_argument("--metrics-port", type=int, default=8002,
                       help="Prometheus metrics port (default: %(default)s)")
    serve.add_argument("--address", default="127.0.0.1",
                       help="address to bind the three ports to (default: %(default)s)")
    serve.add_argument("--ready-timeout", type=float, default=600.0,
                       help="seconds to wait for every model to load (default: %(default)s)")
    serve.add_argument("--openai-port", type=int, default=None,
                       help="also serve the OpenAI API (/v1/chat/completions, ...) on this port, "
                       "forwarding to llm (default: off; see triton-pd openai)")
    serve.add_argument("--verbose", action="store_true",
                       help="print tritonserver's own log (default: only triton-pd's progress)")
    serve.set_defaults(func=cmd_serve)
    doctor = subparsers.add_parser(
        "doctor", help="check this machine: tritonserver, its Python stub, numpy, torch, CUDA "
        "and the optional accelerators")
    doctor.set_defaults(func=cmd_doctor)
    build = subparsers.add_parser("build-repo", help="write a model repository from a deployment YAML")
    build.add_argument("--config", type=Path, default=None,
                       help="deployment YAML (default: the default deployment)")
    build.add_argument("--out", type=Path, required=True, help="directory to write it into")
    build.set_defaults(func=cmd_build_repo)
    demo.register(subparsers)


def cmd_build_repo(args: argparse.Namespace) -> int:
    try:
        dep = _deployment(args.config) if args.config else Deployment()
    except (ValueError, OSError) as exc:
        raise SystemExit(f"triton-pd build-repo: {_one_line(exc)}") from None
    print("\n".join(write_repository(dep, args.out)))
    return 0


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _deployment(path: Path) -> Deployment:
    try:
        return load_deployment(path)
    except ValueError as exc:
        text = str(exc)
        raise ValueError(text if text.startswith(str(path)) else f"{path}: {text}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    note = timed_note("triton-pd serve", time.monotonic())
    work = Path(tempfile.mkdtemp(prefix="triton-pd-"))
    try:
        return _serve(args, work, note)
    except (ValueError, OSError, RuntimeError, StartupError) as exc:
        raise SystemExit(f"triton-pd serve: {_one_line(exc)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _serve(args: argparse.Namespace, work: Path, note: Note) -> int:
    ports = ServerPorts(args.http_port, args.grpc_port, args.metrics_port, args.address)
    check_ports_free(ports)
    door = _front_door(args)
    install = find_triton()
    repo = args.model_repository
    if args.config is not None:
        repo = work / "models"
        write_repository(_deployment(args.config), repo)
    repo = repo or repo_root() / "model_repository"
    plan = repository_plan(repo)
    prepare_sources(plan.sources, note)
    backend_dir = layout_backend_dir(install, work / "backends")
    # issue 8: explicit model control lets stub_watch reload a model whose process died;
    # die_with_parent: a killed launcher takes its tritonserver along (no orphan).
    server = TritonServer(LaunchSpec(install, repo, backend_dir, ports, extra_args=MODEL_CONTROL_ARGS,
                                     die_with_parent=True), work / "tritonserver.log")
    log = ServerLog(work / "tritonserver.log", sys.stdout if args.verbose else None)
    stop = {"now": False, "ready": False}

    def _stop(*_: object) -> None:
        stop["now"] = True
        if not stop["ready"]:
            raise KeyboardInterrupt  # stops waiting for the models to load

    # Both signals stop the server, also when a launching shell left SIGINT ignored.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    # disagg hook (owner of kv*.py): a loopback kvbridge master unless KVBRIDGE_MASTER names one;
    # it exports KVBRIDGE_MASTER, which tritonserver's workers and orchestrators inherit. Its own
    # process, restarted when it dies (issue 8: master_process.py).
    try:
        master = MasterProcess.start_if_needed(lambda line: note(line.removeprefix("triton-pd: ")))
    except ValueError as exc:  # KVBRIDGE_ETCD beyond this host without KVBRIDGE_MASTER
        raise SystemExit(f"triton-pd serve: {exc}") from None
    server.start()
    guard = Guard.start(server.pid or 0)  # stops the server and cleans /dev/shm if we die
    status = 0
    watcher: StubWatcher | None = None
    try:
        wait_ready(server, log, plan, args.ready_timeout, note)
        stop["ready"] = True
        print(f"triton-pd: serving {repo} on http {args.address}:{args.http_port}, "
              f"grpc :{args.grpc_port}, metrics :{args.metrics_port} (tritonserver pid {server.pid}); "
              "Ctrl-C stops", flush=True)
        if door is not None:
            print(f"triton-pd: {door.start(args.ready_timeout)}", flush=True)
        watcher = StubWatcher(server.pid or 0, ModelControl(server.http_url, args.ready_timeout),
                              lambda: server.poll() is None,
                              lambda line: print(line, file=sys.stderr, flush=True))
        while not stop["now"] and server.poll() is None:
            log.poll()
            time.sleep(0.5)
        code = server.poll()
        if not stop["now"] and code is not None:
            print(f"triton-pd: tritonserver (pid {server.pid}) exited with status {code}; "
                  "stopping", file=sys.stderr, flush=True)
            status = 1
    except KeyboardInterrupt:
        pass
    finally:
        if door is not None:
            door.close()  # before the server: no new requests reach a stopping llm
        if watcher is not None:
            watcher.close()  # first: the stubs are about to exit on purpose
        server.close()
        log.poll()
        guard.close()
        if master is not None:
            master.close()
        note("stopped tritonserver and its model processes")
    return status


def _front_door(args: argparse.Namespace) -> FrontDoor | None:
    """The OpenAI front door of ``--openai-port`` (not started), its port checked; or None."""
    if args.openai_port is None:
        return None
    from backends.openai_api.server import FrontDoor, FrontDoorConfig, check_port_free

    check_port_free(args.address, args.openai_port, "--openai-port")
    grpc_host = "127.0.0.1" if args.address in ("0.0.0.0", "::") else args.address
    return FrontDoor(FrontDoorConfig(f"{grpc_host}:{args.grpc_port}", host=args.address,
                                     port=args.openai_port, connect_timeout_s=args.ready_timeout))


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        install = find_triton()
        print(f"tritonserver: {install.server_bin} ({install.origin})")
        print(f"python backend: {install.python_backend_dir}")
        print(f"stub (python {python_version_tag()}): {install.stub}")
    except RuntimeError as exc:
        print(f"tritonserver: not found ({exc})")
    print(numpy_check())
    for name, modules in OPTIONAL.items():
        found = next((m for m in modules if importlib.util.find_spec(m) is not None), None)
        where = "" if found in (None, name) else f" (as {found})"
        print(f"{name}: {'missing' if found is None else 'importable' + where}")
    if importlib.util.find_spec("torch") is not None:
        import torch

        print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
    return 0


def numpy_check() -> str:
    """One line: whether numpy suits the Python backend stub of nvidia-pytriton 0.7.0, which is
    built against numpy 1.x (with numpy 2, BYTES tensors such as text_input arrive corrupted)."""
    try:
        import numpy
    except ImportError:
        return "numpy: missing (the Python backend stub needs numpy < 2)"
    major = int(numpy.__version__.split(".")[0])
    if major >= 2:
        return (f"numpy {numpy.__version__}: TOO NEW for the Python backend stub (built against "
                "numpy 1.x: text tensors arrive corrupted); pip install 'numpy<2'")
    return f"numpy {numpy.__version__}: ok for the Python backend stub (< 2)"
