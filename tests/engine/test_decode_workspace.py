"""The decode workspace never serves stale KV: every path that changes a sequence's KV outside
a workspace decode step (KV import, prefix load, preemption/recompute, prefill chunks, slot
reuse) decodes exactly as the paged-cache path (`decode_workspace=False`) does."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import PRESETS, LoadedFn, make_prompt
from test_engine_kv import MemoryStore

from backends.engine.block_manager import BlockId
from backends.engine.decode_workspace import (
    DecodeWorkspace,
    WorkspaceStep,
    WorkspaceTensor,
    store,
)
from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.engine.kv_transfer import TensorKVSource
from backends.engine.sampling_params import SamplingParams
from backends.engine.sequence import SeqStatus, Sequence
from backends.engine.workspace_slots import WorkspaceSlots

LOGPROB_ATOL = 1e-4  # same KV, same math; only the attention's padding length differs


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=True)


Streams = dict[str, tuple[list[int], list[float]]]


def run(engine: LLMEngine, requests: list[tuple[str, list[int], int]],
        arrivals: list[int]) -> Streams:
    """Add request i at step arrivals[i]; run to completion; tokens and logprobs per id."""
    got: Streams = {}
    step = 0
    while step <= max(arrivals, default=-1) or engine.has_unfinished():
        for (rid, prompt, max_tokens), at in zip(requests, arrivals, strict=True):
            if at == step:
                engine.add_request(rid, prompt, greedy(max_tokens))
        for out in engine.step():
            tokens, logprobs = got.setdefault(out.request_id, ([], []))
            tokens.extend(out.new_token_ids)
            logprobs.extend(out.new_logprobs)
        step += 1
    engine.block_manager.check_integrity()
    return got


def assert_same(got: Streams, want: Streams) -> None:
    assert {rid: toks for rid, (toks, _) in got.items()} == {
        rid: toks for rid, (toks, _) in want.items()}
    for rid, (_, logprobs) in got.items():
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want[rid][1]),
                                   atol=LOGPROB_ATOL, rtol=0)


def workspace_counts(engine: LLMEngine) -> tuple[int, int]:
    """(decode steps run over the workspace, tokens refilled from the paged cache)."""
    slots = engine.runner.workspace
    assert slots is not None
    return slots.num_steps, slots.num_refilled_tokens


def both(loaded: LoadedFn, name: str, config: EngineConfig | None = None
         ) -> tuple[LLMEngine, LLMEngine]:
    """(workspace engine, paged-path engine) with otherwise the same config."""
    config = config or EngineConfig()
    return (LLMEngine(loaded(name), config),
            LLMEngine(loaded(name), dataclasses.replace(config, decode_workspace=False)))


@pytest.mark.parametrize("name", PRESETS)
def test_slot_reuse_and_late_joiners(name: str, loaded: LoadedFn) -> None:
    """Sequences finish at different steps; late ones take freed slots out of batch order,
    and their chunked prefills make mixed steps between workspace steps."""
    requests = [(f"r{i}", make_prompt(i, n), m)
                for i, (n, m) in enumerate([(20, 3), (37, 12), (5, 6), (70, 9), (18, 8)])]
    arrivals = [0, 0, 1, 4, 6]
    ws, paged = both(loaded, name, EngineConfig(max_num_seqs=3, max_num_batched_tokens=24))
    got = run(ws, requests, arrivals)
    assert paged.runner.workspace is None
    steps, refilled = workspace_counts(ws)
    assert steps > 0 and refilled > 0
    assert ws.runner.workspace is not None and ws.runner.workspace.num_mixed_steps > 0
    assert_same(got, run(paged, requests, arrivals))


@pytest.mark.parametrize("name", PRESETS)
def test_preemption_then_decode(name: str, loaded: LoadedFn) -> None:
    lengths = [40, 30, 50] if name == "tiny-llama" else [120, 60, 125]
    requests = [(f"r{i}", make_prompt(10 + i, n), 12) for i, n in enumerate(lengths)]
    ws, paged = both(loaded, name, EngineConfig(num_blocks=6, max_num_batched_tokens=64))
    got = run(ws, requests, [0, 0, 0])
    assert ws.scheduler.num_preemptions > 0
    assert workspace_counts(ws)[0] > 0
    assert_same(got, run(paged, requests, [0, 0, 0]))


@pytest.mark.parametrize("name", PRESETS)
def test_kv_import_then_decode(name: str, loaded: LoadedFn) -> None:
    prompt = make_prompt(21, 45)
    prefill = LLMEngine(loaded(name))
    prefill.add_request("p", prompt, greedy(10), prefill_only=True)
    (first,) = prefill.step()
    export = prefill.export_kv("p")
    source = TensorKVSource(export.num_tokens, [export.layer(i) for i in range(4)])
    decode, paged = both(loaded, name)
    # a running neighbour keeps workspace steps going while the import is admitted
    decode.add_request("n", make_prompt(22, 9), greedy(8))
    paged.add_request("n", make_prompt(22, 9), greedy(8))
    for engine in (decode, paged):
        engine.step()
    decode.add_request("p", prompt, greedy(10), kv_source=source,
                       prior_output_ids=first.new_token_ids)
    paged.add_request("p", prompt, greedy(10))
    got, want = run(decode, [], []), run(paged, [], [])
    steps, refilled = workspace_counts(decode)
    # "p" enters decode through the workspace with its imported prompt refilled
    assert steps > 0 and refilled >= len(prompt)
    assert got["p"][0] == want["p"][0][1:]
    assert_same({"n": got["n"]}, {"n": want["n"]})


@pytest.mark.parametrize("name", PRESETS)
def test_prefix_load_then_decode(name: str, loaded: LoadedFn) -> None:
    block_size = 16 if name == "tiny-llama" else 64
    store = MemoryStore(block_size)
    prompt = make_prompt(31, block_size + 7)
    ws = LLMEngine(loaded(name), EngineConfig(), hooks=store)
    first = run(ws, [("a", prompt, 6)], [0])
    before = workspace_counts(ws)[1]
    second = run(ws, [("b", prompt, 6)], [0])
    assert workspace_counts(ws)[1] - before >= block_size  # the loaded prefix was refilled
    assert ("load", "b", block_size) in [call[:3] for call in store.calls]
    paged = LLMEngine(loaded(name), EngineConfig(decode_workspace=False))
    want = run(paged, [("a", prompt, 6)], [0])
    assert_same({"a": first["a"]}, want)
    assert_same({"a": second["b"]}, want)


def _seq(rid: str, num_computed: int) -> Sequence:
    seq = Sequence(rid, list(range(num_computed + 1)), greedy(4), arrival_index=0)
    seq.num_computed_tokens = num_computed
    seq.block_table = [BlockId(b) for b in range(3, 3 + num_computed // 4 + 1)]
    seq.status = SeqStatus.RUNNING
    return seq


def _slots() -> WorkspaceSlots:
    workspace = DecodeWorkspace(1, (WorkspaceTensor((), (2,)),), 2, torch.float32,
                                torch.device("cpu"))
    return WorkspaceSlots(workspace, block_size=4, max_len=64, max_bytes=1 << 20)


def plan(slots: WorkspaceSlots, seqs: list[Sequence]) -> WorkspaceStep | None:
    positions = [seq.num_computed_tokens for seq in seqs]
    return slots.plan(seqs, positions, torch.tensor(positions))


def _refilled(step: WorkspaceStep) -> list[int]:
    rows = step.refill_rows
    return [] if rows is None else [int(r) for r in rows.tolist()]


def test_slots_refill_rules() -> None:
    slots = _slots()
    a, b = _seq("a", 6), _seq("b", 3)
    step = plan(slots, [a, b])
    assert step is not None
    assert (step.slots.tolist(), step.identity, _refilled(step)) == ([0, 1], True,
                                                                     [0] * 6 + [1] * 3)
    assert step.refill_cache_slots is not None
    assert step.refill_cache_slots.tolist() == [12, 13, 14, 15, 16, 17, 12, 13, 14]
    slots.commit()
    a.num_computed_tokens, b.num_computed_tokens = 7, 4
    step = plan(slots, [b, a])  # in sync: nothing copied
    assert step is not None
    assert (step.slots.tolist(), step.identity, _refilled(step)) == ([1, 0], False, [])
    # not committed (the forward failed): the appended tokens do not count
    a.num_computed_tokens = 8
    step = plan(slots, [a])
    assert step is not None and _refilled(step) == [0] * 8
    slots.commit()
    # recompute back to the very same count: a new KV epoch, so a full refill
    a.reset_for_recompute()
    a.status, a.num_computed_tokens, a.block_table = SeqStatus.RUNNING, 9, [BlockId(7)] * 3
    step = plan(slots, [a])
    assert step is not None and _refilled(step) == [0] * 9
    # b finished: its slot is freed and the next newcomer takes it
    b.status = SeqStatus.FINISHED
    c = _seq("c", 2)
    step = plan(slots, [c])
    assert step is not None and step.slots.tolist() == [1] and _refilled(step) == [1, 1]


def test_flat_index_addresses_row_heads_position() -> None:
    workspace = DecodeWorkspace(1, (WorkspaceTensor((3,), (2,)), WorkspaceTensor((), (5,))), 4,
                                torch.float32, torch.device("cpu"))
    workspace.reserve(6)
    heads, latent = workspace.flat_index(np.array([2, 0]), np.array([5, 1]))
    assert heads.tolist() == [(6 + h) * 6 + 5 for h in range(3)] + [h * 6 + 1 for h in range(3)]
    assert latent.tolist() == [2 * 6 + 5, 1]
    values = torch.arange(12.0).view(2, 3, 2)
    store(workspace.layers[0][0], heads, values)
    assert torch.equal(workspace.layers[0][0][2, :, 5], values[0])
    assert torch.equal(workspace.layers[0][0][0, :, 1], values[1])
