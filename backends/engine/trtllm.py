"""The LLMEngine request interface over TensorRT-LLM's LLM API (optional, GPU only).

Prefill-only requests run as TensorRT-LLM `context_only` requests; their handoff is the
`DisaggregatedParams` TensorRT-LLM returns (its cache transceiver moves the KV, not our
KVExport). A decode request passes that object back through `TRTLLMContext` as `kv_source`
and runs `generation_only`. Outputs arrive when a request finishes (no per-token streaming
through this adapter). Constructing the adapter without `tensorrt_llm` raises RuntimeError.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from backends.engine.outputs import FinishReason, KVExport, RequestOutput
from backends.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TRTLLMContext:
    """A context-phase handoff: TensorRT-LLM's DisaggregatedParams for `num_tokens` prompt tokens."""

    num_tokens: int
    params: Any  # tensorrt_llm.disaggregated_params.DisaggregatedParams


def import_trtllm() -> Any:
    """The tensorrt_llm module; RuntimeError (its ImportError as the cause) when it does not import."""
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as exc:  # the package also fails to import without CUDA libraries
        raise RuntimeError(
            f"TRTLLMEngine needs the optional package tensorrt_llm (extra 'gpu'): {exc}"
        ) from exc


class TRTLLMEngine:
    """`model` is an HF checkpoint directory; `llm_kwargs` go to `tensorrt_llm.LLM`."""

    def __init__(self, model: str, **llm_kwargs: Any) -> None:
        trt = import_trtllm()
        self._trt = trt
        self._disagg = importlib.import_module("tensorrt_llm.disaggregated_params")
        self.llm = trt.LLM(model=model, **llm_kwargs)
        self.tokenizer = self.llm.tokenizer
        self._pending: dict[str, tuple[Any, int, bool]] = {}
        self._contexts: dict[str, TRTLLMContext] = {}
        self._aborted: list[RequestOutput] = []

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
        kv_source: TRTLLMContext | None = None,
        prior_output_ids: Seq[int] = (),
    ) -> None:
        if request_id in self._pending:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        params.validate(self.llm.args.max_seq_len or 1 << 30, len(prompt_token_ids))
        disagg = None
        if prefill_only:
            disagg = self._disagg.DisaggregatedParams(request_type="context_only")
        elif kv_source is not None:
            disagg = kv_source.params
            disagg.request_type = "generation_only"
        future = self.llm.generate_async(
            list(prompt_token_ids),
            sampling_params=self._sampling(params, prefill_only),
            disaggregated_params=disagg,
        )
        self._pending[request_id] = (future, len(prompt_token_ids), prefill_only)

    def _sampling(self, p: SamplingParams, prefill_only: bool) -> Any:
        multi = [w for w in p.bad_words_ids if len(w) > 1]
        if multi:
            raise ValueError(
                f"bad_words_ids: multi-token sequences are not supported by the TensorRT-LLM "
                f"engine, got {multi!r}"
            )
        return self._trt.SamplingParams(
            max_tokens=1 if prefill_only else p.max_tokens,
            temperature=p.temperature,
            top_k=p.top_k or None,
            top_p=p.top_p,
            min_tokens=p.min_tokens,
            seed=p.seed,
            stop_token_ids=list(p.stop_token_ids) or None,
            stop=list(p.stop) or None,
            ignore_eos=p.ignore_eos,
            logprobs=1 if p.logprobs else None,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty != 1.0 else None,
            presence_penalty=p.presence_penalty or None,
            frequency_penalty=p.frequency_penalty or None,
            min_p=p.min_p or None,
            bad_token_ids=[w[0] for w in p.bad_words_ids] or None,
        )

    def has_unfinished(self) -> bool:
        return bool(self._pending) or bool(self._aborted)

    def step(self) -> list[RequestOutput]:
        """Outputs of the requests that finished since the last call (waits ~1 ms if none)."""
        outputs, self._aborted = self._aborted, []
        for request_id, (future, num_prompt, prefill_only) in list(self._pending.items()):
            if not future.done:
                continue
            del self._pending[request_id]
            out = future.outputs[0]
            reason: FinishReason | None = (
                out.finish_reason if out.finish_reason in ("stop", "length") else None
            )
            if prefill_only:
                self._contexts[request_id] = TRTLLMContext(num_prompt, future.disaggregated_params)
                reason = None if reason == "length" else reason
            logprobs = tuple(float(x) for x in (out.logprobs or []) if isinstance(x, float))
            outputs.append(
                RequestOutput(
                    request_id,
                    tuple(out.token_ids),
                    logprobs,
                    out.text,
                    True,
                    reason,
                    num_prompt,
                    len(out.token_ids),
                    0,
                )
            )
        if not outputs and self._pending:
            time.sleep(0.001)  # TensorRT-LLM runs its own loop; avoid a hot spin in callers
        return outputs

    def abort(self, request_id: str) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is None:
            self._contexts.pop(request_id, None)
            return
        entry[0].abort()
        self._aborted.append(RequestOutput(request_id, (), (), "", True, "abort", entry[1], 0, 0))

    def context(self, request_id: str) -> TRTLLMContext:
        """The handoff of a finished prefill-only request (pass it as kv_source to decode)."""
        if request_id not in self._contexts:
            raise ValueError(f"request_id {request_id!r} holds no context-phase handoff")
        return self._contexts[request_id]

    def export_kv(self, request_id: str) -> KVExport:
        raise RuntimeError("TensorRT-LLM moves KV itself: use context(request_id) as the handoff")

    def release_kv(self, request_id: str) -> None:
        if self._contexts.pop(request_id, None) is None:
            raise ValueError(f"request_id {request_id!r} holds no context-phase handoff")

    def close(self) -> None:
        self.llm.shutdown()
