"""TensorRT-LLM adapter: a clear RuntimeError without the package; a split run with it."""

from __future__ import annotations

import importlib.util

import pytest

from backends.engine.sampling_params import SamplingParams
from backends.engine.trtllm import TRTLLMEngine

HAVE_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


@pytest.mark.skipif(HAVE_TRTLLM, reason="tensorrt_llm is installed")
def test_constructing_without_tensorrt_llm_raises() -> None:
    with pytest.raises(RuntimeError, match="needs the optional package tensorrt_llm"):
        TRTLLMEngine("/nonexistent")


@pytest.mark.skipif(not HAVE_TRTLLM, reason="tensorrt_llm is not installed (optional 'gpu' extra)")
def test_context_then_generation_equals_one_request(tmp_path: object) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT-LLM needs CUDA")
    from backends.engine.loader import export_preset

    directory = export_preset("tiny-llama", str(tmp_path))
    engine = TRTLLMEngine(str(directory))
    try:
        prompt = list(range(3, 40))
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        engine.add_request("whole", prompt, params)
        engine.add_request("ctx", prompt, params, prefill_only=True)
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o for o in engine.step()})
        first = done["ctx"].new_token_ids
        engine.add_request(
            "gen", prompt, params, kv_source=engine.context("ctx"), prior_output_ids=first
        )
        while engine.has_unfinished():
            done.update({o.request_id: o for o in engine.step()})
        assert done["gen"].new_token_ids == done["whole"].new_token_ids
    finally:
        engine.close()
