"""Decode graphs: padded static-buffer decode steps equal the plain path; CUDA capture on GPU.

On CPU the "static" mode runs exactly what a captured graph replays (padded buckets, fixed
block-table width, padding rows in the scratch block), so the padding logic is checked here
against the plain eager path and HF. The capture test needs CUDA and skips without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import PRESETS, HFGreedy, LoadedFn, make_prompt

from backends.engine.decode_graphs import bucket_sizes
from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.sampling_params import SamplingParams


def staggered(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int],
              arrivals: list[int]) -> dict[str, list[int]]:
    """Prompt i joins at step arrivals[i] with its own max_tokens; tokens per request."""
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    step = done = 0
    while done < len(prompts):
        for i, at in enumerate(arrivals):
            if at == step:
                params = SamplingParams(max_tokens=max_tokens[i], temperature=0.0,
                                        ignore_eos=True)
                engine.add_request(str(i), prompts[i], params)
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
            done += out.finished
        step += 1
    return got


def test_bucket_sizes() -> None:
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(3) == (1, 2, 3)
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert bucket_sizes(32) == (1, 2, 4, 8, 16, 24, 32)
    with pytest.raises(ValueError, match="max_batch must be > 0, got 0"):
        bucket_sizes(0)


@pytest.mark.parametrize("name", PRESETS)
def test_static_decode_equals_plain_path(name: str, loaded: LoadedFn) -> None:
    """Batches of 1..7 (buckets 1, 2, 4, 8 with padding rows) as sequences join and finish
    at different steps, contexts crossing block edges: the same greedy tokens as the plain
    path, and the scratch block never reaches a sequence."""
    block = 16 if name == "tiny-llama" else 64
    lengths = [3, block - 1, block, block + 1, 2 * block + 3, 7, 40]
    prompts = [make_prompt(500 + i, n) for i, n in enumerate(lengths)]
    max_tokens = [9, 20, 5, 14, 3, 24, 11]
    arrivals = [0, 0, 2, 3, 3, 6, 9]
    results = {}
    for mode in ("off", "static"):
        config = EngineConfig(decode_graphs=mode, graph_max_batch=8, num_blocks=64,
                              max_model_len=512)
        engine = LLMEngine(loaded(name), config)
        results[mode] = staggered(engine, prompts, max_tokens, arrivals)
        assert engine.block_manager.num_free_blocks == 64
        runner = engine.runner
        assert all(c.shape[0] == 64 for c in runner.kv_caches)
        if mode == "static":
            assert runner.graphs is not None and runner.graphs.num_replays > 20
            assert all(c.shape[0] == 65 for c in runner.model_caches)
        else:
            assert runner.graphs is None
    assert results["static"] == results["off"]
    assert [len(results["static"][str(i)]) for i in range(len(prompts))] == max_tokens


def test_static_decode_matches_hf(loaded: LoadedFn, hf_greedy: HFGreedy) -> None:
    prompts = [make_prompt(700 + i, n) for i, n in enumerate((5, 17, 33))]
    engine = LLMEngine(loaded("tiny-llama"),
                       EngineConfig(decode_graphs="static", graph_max_batch=4))
    got = staggered(engine, prompts, [12, 12, 12], [0, 0, 0])
    for i, prompt in enumerate(prompts):
        assert got[str(i)] == hf_greedy("tiny-llama", prompt, 12)[0]


def test_batches_above_graph_max_run_eagerly(loaded: LoadedFn) -> None:
    prompts = [make_prompt(800 + i, 9) for i in range(5)]
    results = {}
    for mode, max_batch in (("off", None), ("static", 2)):
        engine = LLMEngine(loaded("tiny-llama"),
                           EngineConfig(decode_graphs=mode, graph_max_batch=max_batch))
        results[mode] = staggered(engine, prompts, [6, 6, 6, 6, 6], [0, 0, 0, 0, 0])
        if mode == "static":
            graphs = engine.runner.graphs
            assert graphs is not None and graphs.num_replays == 0  # 5 > 2 every step
    assert results["static"] == results["off"]


def test_one_token_prefill_chunk_in_a_decode_only_step(loaded: LoadedFn) -> None:
    """A budget that leaves one token for a prompt chunk makes an all-one-token step in which
    that row does not sample: logits are returned only for the rows that sample."""
    prompts = [make_prompt(900, 2), make_prompt(901, 4)]  # step 1: a decode + 1 of 4 tokens
    results = {}
    for mode in ("off", "static"):
        config = EngineConfig(decode_graphs=mode, graph_max_batch=4, max_num_batched_tokens=2)
        engine = LLMEngine(loaded("tiny-llama"), config)
        results[mode] = staggered(engine, prompts, [5, 5], [0, 0])
    assert results["static"] == results["off"]
    engine = LLMEngine(loaded("tiny-llama"), EngineConfig(max_num_batched_tokens=2))
    assert staggered(engine, prompts[1:], [5], [0])["0"] == results["off"]["1"]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="decode_graphs must be one of .* got 'cuda'"):
        EngineConfig(decode_graphs="cuda")
    with pytest.raises(ValueError, match="decode_graphs 'capture' needs a CUDA device, "
                                         "got device 'cpu'"):
        EngineConfig(decode_graphs="capture")
    with pytest.raises(ValueError, match="graph_max_batch must be > 0, got 0"):
        EngineConfig(graph_max_batch=0)
    assert EngineConfig().graph_mode() is None
    assert EngineConfig(device="cuda").graph_mode() == "capture"
    assert EngineConfig(decode_graphs="static").graph_mode() == "static"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_graphs_equal_static_eager_on_cuda(name: str, dtype: str) -> None:
    """A replay is the static forward: bit-identical tokens (and fp32 equals the plain path)."""
    from backends.engine.loader import load_model

    model = load_model(name, dtype=EngineConfig(dtype=dtype).torch_dtype, device="cuda")
    lengths = [5, 17, 64, 65, 130, 9]
    prompts = [make_prompt(600 + i, n) for i, n in enumerate(lengths)]
    max_tokens = [16, 9, 20, 12, 4, 18]
    arrivals = [0, 0, 1, 4, 4, 7]
    results = {}
    for mode in ("off", "static", "capture"):
        config = EngineConfig(device="cuda", dtype=dtype, decode_graphs=mode, graph_max_batch=8,
                              num_blocks=64, max_model_len=1024)
        engine = LLMEngine(model, config)
        results[mode] = staggered(engine, prompts, max_tokens, arrivals)
        if mode == "capture":
            graphs = engine.runner.graphs
            assert graphs is not None and graphs.num_replays > 20
    assert results["capture"] == results["static"]
    if dtype == "float32":
        assert results["capture"] == results["off"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")
@pytest.mark.parametrize("name", PRESETS)
def test_captured_graphs_fp32_equal_hf_on_cuda(name: str, tmp_path: Path) -> None:
    """fp32 greedy with decode graphs equals transformers' generate on the same GPU."""
    transformers = pytest.importorskip("transformers")
    from backends.engine.loader import export_preset, load_model

    directory = export_preset(name, tmp_path / name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32).to("cuda").eval()
    prompts = [make_prompt(40 + i, 40) for i in range(6)] + [make_prompt(9, 300)]
    engine = LLMEngine(load_model(name, device="cuda"),
                       EngineConfig(device="cuda", graph_max_batch=8))
    got = staggered(engine, prompts, [24] * len(prompts), [0, 0, 0, 1, 1, 2, 3])
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.mode == "capture" and graphs.num_replays > 10
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                              min_new_tokens=24, do_sample=False, pad_token_id=0)
        assert got[str(i)] == out[0, len(prompt):].tolist(), f"prompt {i}"


def test_moe_models_are_not_captured() -> None:
    """MoE layers read routing counts on the host: "auto" leaves them eager, an explicit
    "capture" is refused with the reason; dense models are captured."""
    from backends.engine.config import parse_model_config
    from backends.engine.engine import _graph_mode
    from backends.engine.loader import LoadedModel, build_model
    from backends.engine.presets import PRESETS as SPECS
    from backends.engine.tokenizer import byte_level_tokenizer

    def loaded_from(raw: dict[str, object]) -> LoadedModel:
        config = parse_model_config(raw)
        return LoadedModel(build_model(config), byte_level_tokenizer(), config)

    moe = loaded_from({**SPECS["tiny-mla"].hf_config, "first_k_dense_replace": 1})
    dense = loaded_from(dict(SPECS["tiny-mla"].hf_config))
    assert _graph_mode(EngineConfig(device="cuda"), moe) is None
    assert _graph_mode(EngineConfig(device="cuda"), dense) == "capture"
    assert _graph_mode(EngineConfig(decode_graphs="static"), moe) == "static"
    with pytest.raises(ValueError, match="decode_graphs 'capture': model DeepseekV3ForCausalLM "
                                         "cannot be captured"):
        _graph_mode(EngineConfig(device="cuda", decode_graphs="capture"), moe)


def test_static_decode_under_preemption(loaded: LoadedFn) -> None:
    """A pool too small for every sequence: preempted sequences recompute with new block
    tables (new lists) and come back in other staging rows; tokens equal the plain path."""
    prompts = [make_prompt(950 + i, n) for i, n in enumerate((20, 30, 12, 25, 18))]
    results, preemptions = {}, {}
    for mode in ("off", "static"):
        config = EngineConfig(decode_graphs=mode, graph_max_batch=8, num_blocks=14,
                              max_model_len=128)
        engine = LLMEngine(loaded("tiny-llama"), config)
        results[mode] = staggered(engine, prompts, [40, 30, 45, 20, 35], [0, 0, 1, 2, 2])
        preemptions[mode] = engine.scheduler.num_preemptions
        assert engine.block_manager.num_free_blocks == 14
    assert preemptions["static"] > 0
    assert results["static"] == results["off"]
