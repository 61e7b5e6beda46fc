"""The OpenAI front door (``triton-pd openai``) against the session's disaggregated server
(tiny-llama, 1 prefill + 1 decode), driven by the official ``openai`` client, ``requests`` and
``curl``: the text is llm's own for the same request, streamed deltas add up to it, usage
counts and errors are exact, and a client that goes away frees every worker's KV blocks.

tiny-llama has no chat template: chat itself is tested on the real model (test_openai_chat.py).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from disagg_server import NUM_BLOCKS, DisaggServer, metric
from openai_door import llm_generate, openai_front_door, sse_events, wait_until

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e
pytest_plugins = ("disagg_plugin",)
PROMPT = "The OpenAI front door forwards this prompt"  # no other module sends it
GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def door(disagg_served: DisaggServer) -> Iterator[str]:
    with openai_front_door(disagg_served.grpc_url) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(door: str) -> Iterator[Any]:
    with openai.OpenAI(base_url=door, api_key="unused", max_retries=0) as c:
        yield c


def _create(client: Any, **kwargs: Any) -> Any:
    extra = {k: kwargs.pop(k) for k in ("ignore_eos", "top_k") if k in kwargs}
    return client.completions.create(model="llm", prompt=PROMPT, extra_body=extra, **kwargs)


def test_models(client: Any, door: str) -> None:
    [card] = client.models.list().data
    assert (card.id, card.object, card.owned_by) == ("llm", "model", "triton-pd")
    listed = requests.get(f"{door}/models", timeout=10).json()
    assert listed == {"object": "list", "data": [{"id": "llm", "object": "model",
                                                   "created": card.created, "owned_by": "triton-pd"}]}
    assert requests.get(f"{door}/models/llm", timeout=10).json() == listed["data"][0]


def test_completion_is_llms_own(client: Any, disagg_served: DisaggServer) -> None:
    reply = _create(client, **GREEDY)
    own = llm_generate(disagg_served.http_url, PROMPT, GREEDY)
    [choice] = reply.choices
    assert (choice.text, choice.finish_reason, choice.index) == (own["text_output"], "length", 0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert own["num_output_tokens"] == 24
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (own["num_input_tokens"], 24, own["num_input_tokens"] + 24)
    assert own["num_input_tokens"] == len(PROMPT.encode())  # tiny-llama: one token per byte


def test_streamed_deltas_add_up(client: Any) -> None:
    whole = _create(client, **GREEDY)
    chunks = list(_create(client, stream=True, stream_options={"include_usage": True}, **GREEDY))
    *texts, finish, usage = chunks
    assert {c.id for c in chunks} == {chunks[0].id} and len(texts) >= 2
    assert "".join(c.choices[0].text for c in texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in texts] == [None] * len(texts)
    assert (finish.choices[0].text, finish.choices[0].finish_reason) == ("", "length")
    assert [c.usage for c in texts + [finish]] == [None] * (len(texts) + 1)
    assert usage.choices == [] and usage.usage == whole.usage
    no_usage = list(_create(client, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in no_usage) == whole.choices[0].text
    assert no_usage[-1].choices[0].finish_reason == "length"


def test_stop_and_seed_are_llms(client: Any, disagg_served: DisaggServer) -> None:
    text = llm_generate(disagg_served.http_url, PROMPT, GREEDY)["text_output"]
    stop = text[5:8]
    assert stop and text.find(stop) == 5, text
    reply = _create(client, stop=[stop], **GREEDY)
    own = llm_generate(disagg_served.http_url, PROMPT, GREEDY | {"stop": [stop]})
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (own["text_output"], "stop")
    assert reply.choices[0].text == text[:5]
    sampled = {"max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": 1234, "ignore_eos": True}
    first, second = (_create(client, **sampled).choices[0].text for _ in range(2))
    assert first == second == llm_generate(disagg_served.http_url, PROMPT, sampled)["text_output"]
    assert first != text  # sampled, not greedy
    assert _create(client, **sampled | {"seed": 99}).choices[0].text != first


def test_curl_streams_sse(door: str) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = {"model": "llm", "prompt": PROMPT, "stream": True, **GREEDY}
    out = subprocess.run([curl, "-sN", f"{door}/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body), "-D", "/dev/stderr"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "content-type: text/event-stream; charset=utf-8" in out.stderr.lower()
    *chunks, done = sse_events(out.stdout)
    assert done == "[DONE]"
    assert {c["object"] for c in chunks} == {"text_completion"} and "usage" not in chunks[0]
    assert chunks[-1]["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]
    whole = subprocess.run([curl, "-s", f"{door}/completions", "-d", json.dumps(body | {"stream": False})],
                           capture_output=True, text=True, timeout=60, check=True)
    assert "".join(c["choices"][0]["text"] for c in chunks) == json.loads(whole.stdout)["choices"][0]["text"]


def _error(param: str | None, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


ERRORS = [  # (endpoint, body changes, status, exact error body)
    ("completions", {"n": 2}, 400, _error("n", "n: only 1 is supported by this server, got 2")),
    ("completions", {"echo": True}, 400, _error("echo", "echo: only false is supported by this server, got true")),
    ("completions", {"top_p": 0}, 400, _error("top_p", "top_p must be in (0, 1], got 0.0")),
    ("completions", {"max_tokens": 1000}, 400, _error("max_tokens", "max_tokens must be <= 256, got 1000")),
    ("completions", {"max_tokens": 0}, 400, _error("max_tokens", "max_tokens must be > 0, got 0")),
    ("completions", {"temperature": "hot"}, 400,
     _error("temperature", "temperature: expected a number, got 'hot'")),
    ("completions", {"stop": [""]}, 400, _error("stop", "stop: expected non-empty strings, got ['']")),
    ("completions", {"prompt": [1, 2, 3]}, 400,
     _error("prompt", "prompt: expected a non-empty string (or a list of one), got [1, 2, 3]")),
    ("completions", {"prompt": "x" * 600}, 400, _error(
        "prompt", "prompt: the prompt (length 600) is longer than the maximum model length of 512")),
    ("completions", {"stream_options": {"include_usage": True}}, 400, _error(
        "stream_options", 'stream_options: only allowed when stream is true, got {"include_usage": true}')),
    ("completions", {"model": "gpt-4o"}, 404, _error(
        "model", "model: the model 'gpt-4o' does not exist; this server serves 'llm' (GET /v1/models)",
        "model_not_found")),
    ("chat", {"max_completion_tokens": 300}, 400,
     _error("max_completion_tokens", "max_completion_tokens must be <= 256, got 300")),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, 400, _error(
        "messages", 'messages[0].role: must be one of system, developer, user, assistant, got "tool"')),
    ("chat", {}, 400, _error("messages", "messages: this model has no chat template; send the prompt "
                                         "as plain text")),
]


@pytest.mark.parametrize("endpoint,change,status,expected", ERRORS)
@pytest.mark.parametrize("stream", [False, True])
def test_errors_are_openai_shaped(door: str, endpoint: str, change: dict[str, Any], status: int,
                                  expected: dict[str, Any], stream: bool) -> None:
    if stream and "stream_options" in change:
        pytest.skip("the error is about stream being false")
    base: dict[str, Any] = {"model": "llm", "max_tokens": 4, "stream": stream}
    base |= {"prompt": PROMPT} if endpoint == "completions" else {
        "messages": [{"role": "user", "content": PROMPT}]}
    path = "completions" if endpoint == "completions" else "chat/completions"
    reply = requests.post(f"{door}/{path}", json=base | change, timeout=60)
    assert (reply.status_code, reply.json()) == (status, expected)


def test_openai_client_raises_the_error(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _create(client, max_tokens=4, n=3)
    assert (info.value.status_code, info.value.param, info.value.type) == (400, "n", "invalid_request_error")
    assert info.value.body == {"message": "n: only 1 is supported by this server, got 3",
                               "type": "invalid_request_error", "param": "n", "code": None}


def test_bad_json_and_unknown_route(door: str) -> None:
    reply = requests.post(f"{door}/completions", data=b"{not json", timeout=10)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith("the request body is not valid JSON (Expecting")
    reply = requests.get(f"{door}/embeddings", timeout=10)
    assert (reply.status_code, reply.json()) == (404, _error(None, "GET /v1/embeddings: Not Found"))


def _generated(served: DisaggServer) -> float:
    return metric(served, "pd_generation_tokens_total", "llm")


def _used_decode(served: DisaggServer) -> float:
    return NUM_BLOCKS - metric(served, "pd_kv_blocks_free", "decode")


def _all_free(served: DisaggServer) -> bool:
    return all(metric(served, "pd_kv_blocks_free", m) == NUM_BLOCKS for m in ("prefill", "decode"))


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_and_frees_blocks(door: str, disagg_served: DisaggServer, stream: bool) -> None:
    """A finished request adds its 256 tokens to pd_generation_tokens_total (~1 s here); a
    cancelled one adds none: the counter stays put (the request never finished) while every
    block comes back."""
    assert wait_until(lambda: _all_free(disagg_served))
    before = _generated(disagg_served)
    body = {"model": "llm", "prompt": f"{time.time()}: hung up on ({stream})", "max_tokens": 256,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        reply = requests.post(f"{door}/completions", json=body, stream=True, timeout=60)
        lines = reply.iter_lines()
        assert [next(lines)[:6] for _ in range(4)] == [b"data: ", b""] * 2  # 2 chunks
        reply.close()  # at once: the whole request takes ~1 s
    else:
        host, port = door.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            data = json.dumps(body).encode()
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            # Hang up once decode is generating: its pool has grown by two blocks since the
            # hand-off (a cancel during the prefill->decode hand-off is not reliable yet).
            first = wait_until(lambda: _used_decode(disagg_served), 10)
            assert first and wait_until(lambda: _used_decode(disagg_served) >= first + 2, 10)
    assert wait_until(lambda: _all_free(disagg_served))
    time.sleep(2.0)  # longer than the whole request would take
    if _generated(disagg_served) == before + 256:
        # The front door cancelled its gRPC call, but the request ran on: tritonserver's llm
        # sometimes loses a cancel sent mid-decode (also with tritonclient's own
        # stop_stream(cancel_requests=True), ~1 in 8 here). Reported; not the front door's.
        pytest.xfail("llm finished a request whose gRPC call was cancelled (server-side race)")
    assert _generated(disagg_served) == before
    reply = requests.post(f"{door}/completions", json=body | {"stream": False, "max_tokens": 8}, timeout=60)
    assert reply.json()["usage"]["completion_tokens"] == 8  # the server keeps serving
    assert wait_until(lambda: _generated(disagg_served) == before + 8)
