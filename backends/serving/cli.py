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

from backends.serving import demo
from backends.serving.deploy import Deployment, load_deployment, write_repository
from backends.serving.install import find_triton, python_version_tag, repo_root
from backends.serving.kv_master import start_master_if_needed
from backends.serving.launcher import LaunchSpec, ServerPorts, TritonServer
from backends.serving.layout import layout_backend_dir

OPTIONAL = ("torch", "flash_mla", "deep_ep", "nixl", "tensorrt_llm", "triton", "tritonclient")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="start tritonserver with the pd backends")
    serve.add_argument("--model-repository", type=Path, default=None)
    serve.add_argument("--config", type=Path, default=None, help="deployment YAML (generates a repository)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--address", default="127.0.0.1")
    serve.add_argument("--ready-timeout", type=float, default=600.0)
    serve.set_defaults(func=cmd_serve)
    doctor = subparsers.add_parser("doctor", help="print what serving found on this machine")
    doctor.set_defaults(func=cmd_doctor)
    build = subparsers.add_parser("build-repo", help="write a model repository from a deployment YAML")
    build.add_argument("--config", type=Path, default=None)
    build.add_argument("--out", type=Path, required=True)
    build.set_defaults(func=cmd_build_repo)
    demo.register(subparsers)


def cmd_build_repo(args: argparse.Namespace) -> int:
    dep = load_deployment(args.config) if args.config else Deployment()
    print("\n".join(write_repository(dep, args.out)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    install = find_triton()
    work = Path(tempfile.mkdtemp(prefix="triton-pd-"))
    repo = args.model_repository
    if args.config is not None:
        repo = work / "models"
        write_repository(load_deployment(args.config), repo)
    repo = repo or repo_root() / "model_repository"
    backend_dir = layout_backend_dir(install, work / "backends")
    ports = ServerPorts(args.http_port, args.grpc_port, args.metrics_port, args.address)
    server = TritonServer(LaunchSpec(install, repo, backend_dir, ports))
    stop = {"now": False}
    # Both signals stop the server, also when a launching shell left SIGINT ignored.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.update(now=True))
    # disagg hook (owner of kv*.py): a loopback kvbridge master unless KVBRIDGE_MASTER names one;
    # it exports KVBRIDGE_MASTER, which tritonserver's workers and orchestrators inherit.
    master = start_master_if_needed()
    server.start()
    status = 0
    try:
        server.wait_ready(args.ready_timeout)
        print(f"triton-pd: serving {repo} on http {args.address}:{args.http_port}, "
              f"grpc :{args.grpc_port}, metrics :{args.metrics_port} (tritonserver pid {server.pid}); "
              "Ctrl-C stops", flush=True)
        while not stop["now"] and server.poll() is None:
            time.sleep(0.5)
        code = server.poll()
        if not stop["now"] and code is not None:
            print(f"triton-pd: tritonserver (pid {server.pid}) exited with status {code}; "
                  "stopping", file=sys.stderr, flush=True)
            status = 1
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        if master is not None:
            master.close()
        shutil.rmtree(work, ignore_errors=True)
    return status


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        install = find_triton()
        print(f"tritonserver: {install.server_bin} ({install.origin})")
        print(f"python backend: {install.python_backend_dir}")
        print(f"stub (python {python_version_tag()}): {install.stub}")
    except RuntimeError as exc:
        print(f"tritonserver: not found ({exc})")
    for name in OPTIONAL:
        found = importlib.util.find_spec(name) is not None
        print(f"{name}: {'importable' if found else 'missing'}")
    if importlib.util.find_spec("torch") is not None:
        import torch

        print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
    return 0
