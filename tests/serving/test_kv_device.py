"""GPU-to-GPU KV on one host: a decode engine reads a prefill engine's blocks straight from its
CUDA cache (CUDA IPC), checked by block generations, with the host pool as the fallback.

On CPU: a handle's device ref is ignored by a consumer without a GPU, and a DeviceKVSource whose
producer cache cannot be opened imports over the host pool, token for token. On a GPU (skipped
without one): a producer in another process, a device read equal to one engine, and a read of
blocks the producer reused meanwhile falling back to the host path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kv_device_producer import GREEDY, PROMPT, prefill_publish

from backends.engine.engine import LLMEngine
from backends.engine.engine_config import EngineConfig
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv import NodeTransfer, build_worker
from kvbridge.handle import KVHandle
from kvbridge.pull import DeviceKVSource, PulledKVSource
from kvbridge.transport.cuda_ipc import DeviceRef

ROOT = Path(__file__).resolve().parents[2]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA GPU")

Worker = tuple[LLMEngine, NodeTransfer]


def spec(device: str) -> EngineSpec:
    return EngineSpec(source="tiny-llama", num_blocks=64, max_model_len=256, max_num_seqs=8, device=device)


def expected(device: str) -> list[int]:
    engine = LLMEngine("tiny-llama", EngineConfig(block_size=16, num_blocks=64, max_model_len=256,
                                                  device=device))
    [result] = engine.generate([PROMPT], GREEDY)
    return list(result.output_token_ids)


def decode(worker: Worker, rid: str, first: int, source: Any) -> list[int]:
    engine, _ = worker
    engine.add_request(rid, PROMPT, GREEDY, kv_source=source, prior_output_ids=[first])
    tokens = [first]
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    return tokens


@pytest.fixture(scope="module")
def cpu_pair() -> Iterator[tuple[Worker, Worker]]:
    prefill, dec = build_worker(spec("cpu"), "prefill"), build_worker(spec("cpu"), "decode")
    yield prefill, dec
    prefill[1].close()
    dec[1].close()


def _unopenable_ref(num_blocks: int) -> DeviceRef:
    layer = [[0, b"\0" * 64, 1 << 20, 0, b"", 0, b"", False], 0, [64, 16, 128], [2048, 128, 1], "float32"]
    return DeviceRef("GPU-elsewhere", [layer] * 4, "kvb-genpool-g0-none", 64,
                     tuple(range(num_blocks)), (1,) * num_blocks)


def test_cpu_consumer_ignores_the_device_ref(cpu_pair: tuple[Worker, Worker]) -> None:
    prefill, dec = cpu_pair
    first, handle = prefill_publish(prefill, "ignored")
    parsed = KVHandle.from_bytes(handle)
    assert parsed.device_ref == b""  # a CPU producer shares nothing
    with_ref = dataclasses.replace(parsed, device_ref=_unopenable_ref(4).to_bytes()).to_bytes()
    source = dec[1].source(with_ref)
    assert isinstance(source.inner, PulledKVSource)
    assert decode(dec, "ignored", first, source) == expected("cpu")


def test_unopenable_device_ref_imports_over_the_host_pool(cpu_pair: tuple[Worker, Worker]) -> None:
    prefill, dec = cpu_pair
    first, handle = prefill_publish(prefill, "fallback")
    node = dec[1].node
    before = dict(node.import_counts)
    pulled = PulledKVSource(KVHandle.from_bytes(handle), node.shm, node.tcp, 10.0)
    source = DeviceKVSource(_unopenable_ref(4), torch.device("cpu"), pulled, node._imported)
    assert decode(dec, "fallback", first, source) == expected("cpu")
    assert source.path == "host" and source.elapsed_ns > 0
    assert node.import_counts == {**before, "host": before["host"] + 1}
    prefill[1].maintain()
    assert len(prefill[1].node.leases) == 0


class Producer:
    """tests/serving/kv_device_producer.py in a subprocess, driven line by line."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("kv_device_producer.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"producer ended (rc {self.proc.poll()})"
        result: dict[str, Any] = json.loads(answer)
        return result

    def close(self) -> None:
        try:
            self.ask("exit")
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def gpu_pair() -> Iterator[tuple[Producer, Worker]]:
    producer = Producer()
    dec = build_worker(spec("cuda"), "decode")
    try:
        yield producer, dec
    finally:
        dec[1].close()
        producer.close()


@cuda_only
def test_decode_reads_the_prefill_cache_device_to_device(gpu_pair: tuple[Producer, Worker]) -> None:
    producer, dec = gpu_pair
    answer = producer.ask("publish dev-1")
    handle = bytes.fromhex(answer["handle"])
    assert KVHandle.from_bytes(handle).device_ref
    source = dec[1].source(handle)
    assert isinstance(source.inner, DeviceKVSource)
    assert decode(dec, "dev-1", answer["first"], source) == expected("cuda")
    assert source.inner.path == "device"
    assert dec[1].import_counts["device"] == 1


@cuda_only
def test_blocks_reused_by_the_producer_fall_back_to_the_host_pool(gpu_pair: tuple[Producer, Worker]) -> None:
    producer, dec = gpu_pair
    answer = producer.ask("publish dev-2")
    assert producer.ask("reuse")["taken"] == 64  # every block handed out again: generations moved
    source = dec[1].source(bytes.fromhex(answer["handle"]))
    assert decode(dec, "dev-2", answer["first"], source) == expected("cuda")
    assert isinstance(source.inner, DeviceKVSource) and source.inner.path == "host"
