"""Helpers of the OpenAI front door's e2e tests: start ``triton-pd openai`` as a user does, ask
``llm`` itself for the reference answer, and read an SSE body."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests

from backends.launch.install import repo_root
from backends.launch.launcher import free_ports


@contextmanager
def openai_front_door(grpc_url: str) -> Iterator[str]:
    """``triton-pd openai --grpc-url grpc_url`` on a free port; yields its base URL (…/v1).
    On exit: SIGINT, and it must stop within 30 s with status 0 and free its port."""
    [port] = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "backends.cli", "openai", "--grpc-url", grpc_url,
                             "--port", str(port), "--connect-timeout", "120"],
                            cwd=repo_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert f"OpenAI API on http://127.0.0.1:{port}/v1 (model 'llm' at {grpc_url}); Ctrl-C stops" in line, line
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert rest == "", rest  # no traceback, no access log
        with requests.Session() as session:
            try:
                session.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                raise AssertionError(f"port {port} still answers after SIGINT")
            except requests.ConnectionError:
                pass


def llm_generate(http_url: str, text_input: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """``llm``'s own non-streamed answer (HTTP generate) with its finish reason and counts."""
    body = {"text_input": text_input, "sampling_parameters": json.dumps(sampling),
            "exclude_input_in_output": True, "return_finish_reason": True,
            "return_num_input_tokens": True, "return_num_output_tokens": True}
    base = http_url if http_url.startswith("http") else f"http://{http_url}"
    reply = requests.post(f"{base}/v2/models/llm/generate", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    out: dict[str, Any] = reply.json()
    return out


def sse_events(raw: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded except the final ``[DONE]``; checks
    that every event is one ``data:`` line followed by a blank line."""
    assert raw.endswith("\n\n"), raw[-80:]
    events: list[Any] = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def wait_until(check: Any, timeout_s: float = 20.0) -> Any:
    """``check()``'s first truthy value within ``timeout_s`` (polled), else its last value."""
    deadline = time.monotonic() + timeout_s
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(0.1)
        value = check()
    return value
