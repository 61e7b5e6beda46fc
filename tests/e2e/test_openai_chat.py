"""Chat through the OpenAI front door of ``triton-pd serve --openai-port`` on the real default
model (SmolLM2-135M-Instruct, 1 prefill + 1 decode, as a user starts it), with the official
``openai`` client and ``curl``: the answer is llm's own for the same conversation rendered with
the model's chat template, the stream has OpenAI's chunk shapes and adds up to it, usage counts
are exact, and Ctrl-C stops the front door with the server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from openai_door import llm_generate, sse_events

from backends.engine.sources import DEFAULT_MODEL, packaged_model_path
from backends.launch.install import find_triton, repo_root
from backends.launch.launcher import free_ports

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
MAX_NEW = 12


@dataclass(frozen=True, slots=True)
class Serve:
    http_url: str
    base_url: str  # the front door's …/v1


@pytest.fixture(scope="module")
def serve() -> Iterator[Serve]:
    try:
        find_triton()
        packaged_model_path(DEFAULT_MODEL)
    except (RuntimeError, ValueError) as exc:
        pytest.skip(str(exc))
    http, grpc, metrics, door = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k != "KVBRIDGE_MASTER"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends.cli", "serve", "--http-port", str(http), "--grpc-port",
         str(grpc), "--metrics-port", str(metrics), "--openai-port", str(door), "--ready-timeout", "240"],
        cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "OpenAI API on" in line:
            break
    assert lines[-1] == (f"triton-pd: OpenAI API on http://127.0.0.1:{door}/v1 (model 'llm' at "
                         f"127.0.0.1:{grpc})\n"), "".join(lines)
    try:
        yield Serve(f"http://127.0.0.1:{http}", f"http://127.0.0.1:{door}/v1")
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert re.search(r"stopped tritonserver and its model processes", rest), rest
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{door}/v1/models", timeout=2)


@pytest.fixture(scope="module")
def own(serve: Serve) -> dict[str, Any]:
    """llm's own answer to MESSAGES, the server rendering them with the chat template."""
    return llm_generate(serve.http_url, json.dumps(MESSAGES),
                        {"max_tokens": MAX_NEW, "temperature": 0, "apply_chat_template": True})


@pytest.fixture(scope="module")
def client(serve: Serve) -> Iterator[Any]:
    with openai.OpenAI(base_url=serve.base_url, api_key="unused", max_retries=0) as c:
        yield c


def test_chat_is_llms_own(client: Any, own: dict[str, Any]) -> None:
    reply = client.chat.completions.create(model="llm", messages=MESSAGES, temperature=0,
                                           max_completion_tokens=MAX_NEW)
    [choice] = reply.choices
    assert (choice.message.role, choice.message.content) == ("assistant", own["text_output"])
    assert choice.finish_reason == own["finish_reason"]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == \
        (own["num_input_tokens"], own["num_output_tokens"])
    assert reply.usage.total_tokens == own["num_input_tokens"] + own["num_output_tokens"]
    assert "Paris" in choice.message.content


def test_streamed_chat_chunks(client: Any, own: dict[str, Any]) -> None:
    stream = client.chat.completions.create(model="llm", messages=MESSAGES, temperature=0,
                                            max_tokens=MAX_NEW, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    print("\n".join(c.model_dump_json() for c in chunks))  # the client's view, for the record
    first, *texts, finish, usage = chunks
    assert {c.id for c in chunks} == {first.id} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    assert [c.choices[0].delta.role for c in texts] == [None] * len(texts)
    assert "".join(c.choices[0].delta.content for c in texts) == own["text_output"]
    assert [c.choices[0].finish_reason for c in [first, *texts]] == [None] * (len(texts) + 1)
    assert finish.choices[0].finish_reason == own["finish_reason"]
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.completion_tokens) == \
        (own["num_input_tokens"], own["num_output_tokens"])


def test_curl_chat(serve: Serve, own: dict[str, Any]) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = {"model": "llm", "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_NEW}
    url = f"{serve.base_url}/chat/completions"
    whole = json.loads(subprocess.run([curl, "-s", url, "-d", json.dumps(body)], capture_output=True,
                                      text=True, timeout=120, check=True).stdout)
    assert whole["choices"] == [{"index": 0, "message": {"role": "assistant", "content": own["text_output"]},
                                 "logprobs": None, "finish_reason": own["finish_reason"]}]
    raw = subprocess.run([curl, "-sN", url, "-d", json.dumps(body | {"stream": True})],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    *chunks, done = sse_events(raw)
    assert done == "[DONE]" and all("usage" not in c for c in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": own["finish_reason"]}]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:-1]) == own["text_output"]


def test_max_completion_tokens_and_stop(client: Any, serve: Serve, own: dict[str, Any]) -> None:
    reply = client.chat.completions.create(model="llm", messages=MESSAGES, temperature=0,
                                           max_completion_tokens=3)
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("length", 3)
    assert own["text_output"].startswith(reply.choices[0].message.content)
    stop = "Paris"
    reply = client.chat.completions.create(model="llm", messages=MESSAGES, temperature=0,
                                           max_completion_tokens=MAX_NEW, stop=stop)
    expected = own["text_output"][:own["text_output"].index(stop)]
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
