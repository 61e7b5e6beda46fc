"""A prefill worker in its own process for test_kv_device.py (CUDA IPC needs two processes).

Reads commands on stdin, one per line, and answers one JSON line each:
  publish RID     -> {"first": token, "handle": hex}   (prefill-only run, KV published, blocks freed)
  reuse           -> {"taken": n}                      (every free engine block handed out and freed
                                                        again: each one's generation bumped)
  exit            -> {} and the process ends (closing the node unlinks its pool and table)
"""

from __future__ import annotations

import json
import sys
from typing import Any

from backends.engine.sampling_params import SamplingParams
from backends.engine.tokenizer import byte_level_tokenizer
from backends.serving.engine_spec import EngineSpec
from backends.serving.kv import build_worker

PROMPT = byte_level_tokenizer().encode("The quick brown fox jumps over the lazy dog, twice")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prefill_publish(worker: tuple[Any, Any], rid: str) -> tuple[int, bytes]:
    """(first token, handle bytes) of a prefill-only run of PROMPT; the engine's blocks are freed."""
    engine, transfer = worker
    engine.add_request(rid, PROMPT, GREEDY, prefill_only=True)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    published = transfer.publish(engine.export_kv(rid), PROMPT)
    engine.release_kv(rid)
    return outs[-1].new_token_ids[0], published.handle


def main() -> None:
    engine, transfer = build_worker(
        EngineSpec(source="tiny-llama", num_blocks=64, max_model_len=256, max_num_seqs=8, device="cuda"),
        "prefill")
    try:
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            answer: dict[str, object] = {}
            if command == "publish":
                first, handle = prefill_publish((engine, transfer), arg)
                answer = {"first": first, "handle": handle.hex()}
            elif command == "reuse":
                bm = engine.block_manager
                taken = bm.allocate(bm.num_free_blocks)
                bm.free(taken)
                answer = {"taken": len(taken)}
            print(json.dumps(answer), flush=True)
            if command == "exit":
                break
    finally:
        transfer.close()


if __name__ == "__main__":
    main()
