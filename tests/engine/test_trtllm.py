"""TensorRT-LLM adapter: a clear RuntimeError without the package; a split run with it; the
worker's engine factory building it for ``engine.backend: tensorrt_llm`` (or refusing, naming
the field and the package)."""

from __future__ import annotations

import importlib.util

import pytest

from backends.engine.sampling_params import SamplingParams
from backends.engine.trtllm import TRTLLMEngine
from backends.serving.engine_factory import build_engine, trtllm_kwargs
from backends.serving.engine_spec import EngineSpec

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


@pytest.mark.skipif(HAVE_TRTLLM, reason="tensorrt_llm is installed")
def test_factory_refuses_tensorrt_llm_backend_without_the_package() -> None:
    spec = EngineSpec(source="tiny-llama", backend="tensorrt_llm", device="cuda")
    with pytest.raises(ValueError) as info:
        build_engine(spec)  # really tries to import tensorrt_llm
    assert str(info.value) == ("engine.backend: 'tensorrt_llm' needs the tensorrt_llm package, which does "
                               "not import here (No module named 'tensorrt_llm')")


def test_trtllm_kwargs_carry_the_spec_limits() -> None:
    spec = EngineSpec(backend="tensorrt_llm", max_num_seqs=8, max_num_batched_tokens=512,
                      max_model_len=256, dtype="bfloat16")
    assert trtllm_kwargs(spec) == {"max_batch_size": 8, "max_num_tokens": 512, "max_seq_len": 256,
                                   "dtype": "bfloat16"}


@pytest.mark.skipif(not HAVE_TRTLLM, reason="tensorrt_llm is not installed (optional 'gpu' extra)")
def test_factory_builds_tensorrt_llm_engine(tmp_path: object) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT-LLM needs CUDA")
    from backends.engine.loader import export_preset

    with pytest.raises(ValueError, match=r"^model: engine.backend 'tensorrt_llm' needs an HF checkpoint "
                                         r"directory, got the preset 'tiny-llama'$"):
        build_engine(EngineSpec(source="tiny-llama", backend="tensorrt_llm", device="cuda"))
    directory = export_preset("tiny-llama", str(tmp_path))
    engine = build_engine(EngineSpec(source=str(directory), backend="tensorrt_llm", device="cuda",
                                     max_model_len=256, max_num_seqs=4))
    try:
        assert isinstance(engine, TRTLLMEngine)
        engine.add_request("r", list(range(3, 20)), SamplingParams(max_tokens=4, temperature=0.0,
                                                                   ignore_eos=True))
        done = []
        while engine.has_unfinished():
            done.extend(engine.step())
        assert [(o.request_id, len(o.new_token_ids), o.finish_reason) for o in done] == [("r", 4, "length")]
    finally:
        engine.close()
