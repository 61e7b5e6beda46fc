"""LLMEngine: the request API over scheduler, runner and sampler (see docs/contracts.md).

One thread drives an engine: `add_request`, `abort`, `step`, `export_kv`, `release_kv` and
`close` are not thread-safe. `step` reads as schedule -> run -> postprocess. The one exception
is KV import (`kv_source`): the engine's `KVImporter` threads call `KVSource.read_layer` and write
the cache rows of the blocks reserved for that import, and nothing else; the step thread never
waits on a source, and a request joins the batch at the first step after its import ended.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from backends.engine.block_manager import BlockManager
from backends.engine.engine_config import EngineConfig
from backends.engine.hooks import KVHooks, KVSource
from backends.engine.kv_import import KVImporter
from backends.engine.kv_transfer import KVAdmission, PagedCacheAccess, export_kv
from backends.engine.loader import LoadedModel, load_model
from backends.engine.outputs import (
    FinishReason,
    GenerationResult,
    KVExport,
    KVLayout,
    RequestOutput,
)
from backends.engine.postprocess import StopChecker
from backends.engine.runner import ModelRunner
from backends.engine.sampler import Sampler, SampleRow
from backends.engine.sampling_params import SamplingParams
from backends.engine.scheduler import ScheduledSeq, Scheduler
from backends.engine.sequence import Sequence
from backends.engine.text_stream import TextStream

# A step with nothing to run but imports in flight waits this long at most for one to end, so a
# caller looping on `step` does not spin (a new request waits at most this long for its step).
IMPORT_IDLE_WAIT_S = 0.01


class LLMEngine:
    """A paged-KV engine over one model. `config` is resolved against the model at init."""

    def __init__(
        self,
        source: str | LoadedModel,
        config: EngineConfig | None = None,
        hooks: KVHooks | None = None,
    ) -> None:
        config = config or EngineConfig()
        loaded = (
            load_model(source, dtype=config.torch_dtype, device=config.device)
            if isinstance(source, str)
            else source
        )
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.hooks = hooks
        mc = loaded.config
        elem = torch.empty((), dtype=config.torch_dtype).element_size()
        self.config = config.resolve(
            is_mla=mc.mla is not None,
            model_max_len=mc.max_position_embeddings,
            kv_bytes_per_token=mc.num_layers * mc.kv_width * elem,
        )
        cfg = self.config
        block_size, num_blocks = _resolved(cfg.block_size), _resolved(cfg.num_blocks)
        self.max_model_len = _resolved(cfg.max_model_len)
        self.kv_layout = KVLayout(
            config.dtype, mc.num_layers, block_size, mc.kv_width, mc.kv_width * elem
        )
        self.block_manager = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(
            loaded.model,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=cfg.torch_dtype,
            device=torch.device(cfg.device),
            max_num_seqs=cfg.max_num_seqs if cfg.decode_workspace else None,
            max_model_len=self.max_model_len,
            graph_mode=_graph_mode(cfg, loaded),
            graph_max_batch=cfg.graph_max_batch or cfg.max_num_seqs,
        )
        self.cache_access = PagedCacheAccess(self.runner.kv_caches, self.kv_layout)
        self.importer = KVImporter(self.runner.kv_caches, cfg.kv_import_timeout_s)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            admission=KVAdmission(self.cache_access, hooks),
            importer=self.importer,
        )
        eos = tuple(dict.fromkeys((self.tokenizer.eos_token_id, *mc.eos_token_ids)))
        self.sampler = Sampler(eos, cfg.seed)
        self.stop_checker = StopChecker(self.tokenizer, eos, self.max_model_len)
        self._seqs: dict[str, Sequence] = {}
        self._texts: dict[str, TextStream] = {}
        self._held: dict[str, Sequence] = {}  # finished prefill-only requests holding KV
        self._pending: list[RequestOutput] = []
        # async_output: the last step's outputs whose text is made during this step's device
        # work (see _Deferred)
        self.async_output = cfg.async_output_on()
        self._deferred: list[_Deferred] = []
        self._arrivals = 0

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
        kv_source: KVSource | None = None,
        prior_output_ids: Seq[int] = (),
    ) -> None:
        """Queue a request. ValueError (field and value named) for any bad input."""
        if request_id in self._seqs or request_id in self._held:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        params.validate(self.max_model_len, len(prompt_token_ids))
        vocab = self.model_config.vocab_size
        bad = [t for t in [*prompt_token_ids, *prior_output_ids] if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        bad = [t for word in params.bad_words_ids for t in word if t >= vocab]
        if bad:
            raise ValueError(
                f"bad_words_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})"
            )
        if len(prior_output_ids) >= params.max_tokens:
            raise ValueError(
                f"prior_output_ids has {len(prior_output_ids)} tokens, "
                f"not fewer than max_tokens={params.max_tokens}"
            )
        if kv_source is not None and not 0 < kv_source.num_tokens <= len(prompt_token_ids):
            raise ValueError(
                f"kv_source.num_tokens must be in (0, {len(prompt_token_ids)}], "
                f"got {kv_source.num_tokens}"
            )
        seq = Sequence(
            request_id,
            prompt_token_ids,
            params,
            arrival_index=self._arrivals,
            prefill_only=prefill_only,
            kv_source=kv_source,
            prior_output_ids=prior_output_ids,
        )
        self._arrivals += 1
        self._seqs[request_id] = seq
        self._texts[request_id] = self.stop_checker.new_text(seq)
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        """Requests in flight, outputs to emit, or an aborted import's blocks still to free."""
        return bool(self._seqs or self._pending or self._deferred
                    or self.scheduler.num_orphaned_imports)

    def close(self) -> None:
        """Stop the import threads (imports in flight are cancelled); idempotent."""
        self.importer.close()

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; one output per request that sampled or ended."""
        outputs, self._pending = self._pending, []
        scheduled = self._schedule(may_wait=not outputs and not self._deferred)
        if not scheduled:
            return outputs + self._flush_text()
        logits = self.runner.execute(scheduled)
        outputs += self._flush_text()  # the last step's text, while the device runs this one
        sampling = [item for item in scheduled if item.samples]
        rows = [
            SampleRow(s.params, s.num_output_tokens, s.token_ids, s.num_prompt_tokens)
            for s in (item.seq for item in sampling)
        ]
        sampled = self.sampler.sample(logits, rows) if rows else None
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self._publish(item.seq)
        if sampled is not None:
            for i, item in enumerate(sampling):
                lp = sampled.logprobs[i] if sampled.logprobs is not None else None
                out = self._postprocess(item.seq, sampled.token_ids[i], lp)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _flush_text(self) -> list[RequestOutput]:
        """The deferred outputs of the last step, with their text."""
        done, self._deferred = self._deferred, []
        visible = self._visible_text
        return [RequestOutput(seq.request_id, new_ids, new_logprobs,
                              visible(seq, text, new_ids, reason, finished), finished, reason,
                              num_prompt, num_output, num_cached)
                for seq, text, new_ids, new_logprobs, finished, reason, num_prompt, num_output,
                num_cached in done]

    def _schedule(self, may_wait: bool) -> list[ScheduledSeq]:
        """This step's batch. With none (and `may_wait`) while imports are in flight, wait up to
        IMPORT_IDLE_WAIT_S for one to end and schedule again."""
        scheduled = self._schedule_once()
        if scheduled or not may_wait or not self.scheduler.wait_for_imports(IMPORT_IDLE_WAIT_S):
            return scheduled
        return self._schedule_once()

    def _schedule_once(self) -> list[ScheduledSeq]:
        """The scheduler's pick; the imported full blocks of sequences that joined after an
        import are reported to the hooks now, before any step computes after them."""
        out = self.scheduler.schedule()
        for seq in out.imported:
            self._publish(seq)
        return out.scheduled

    def _publish(self, seq: Sequence) -> None:
        """Report the full blocks of `seq` not yet reported (their KV is written)."""
        full = seq.num_computed_tokens // self.kv_layout.block_size
        if self.hooks is None or full <= seq.num_published_blocks:
            return
        self.hooks.blocks_computed(
            seq.request_id,
            seq.token_ids[: full * self.kv_layout.block_size],
            list(seq.block_table[seq.num_published_blocks : full]),
            self.cache_access,
        )
        seq.num_published_blocks = full

    def _postprocess(self, seq: Sequence, token: int,
                     logprob: float | None) -> RequestOutput | None:
        """Append the token and decide whether the sequence ends; its output, or None when
        its text is deferred to the next step (async_output, no stop strings: ending never
        depends on the text then)."""
        seq.token_ids.append(token)
        if seq.params.logprobs and logprob is not None:
            seq.logprobs.append(logprob)
        text_stream = self._texts[seq.request_id]
        reason = self.stop_checker.check(seq, text_stream)
        finished = reason is not None or seq.prefill_only
        seq.finish_reason = reason
        new_logprobs = (logprob,) if seq.params.logprobs and logprob is not None else ()
        if self.async_output and not seq.params.stop:
            self._deferred.append((seq, text_stream, (token,), new_logprobs, finished, reason,
                                   seq.num_prompt_tokens, seq.num_output_tokens,
                                   seq.num_cached_tokens))
            if finished:
                self._finish(seq)
            return None
        text = self._visible_text(seq, text_stream, (token,), reason, finished)
        if finished:
            self._finish(seq)
        return self._output(seq, (token,), new_logprobs, text, finished)

    def _visible_text(self, seq: Sequence, text: TextStream, new_ids: tuple[int, ...],
                      reason: FinishReason | None, finished: bool) -> str:
        if not self.config.detokenize:
            return ""
        return self.stop_checker.visible_text(seq, text, new_ids, reason, finished)

    def _output(
        self,
        seq: Sequence,
        new_ids: tuple[int, ...],
        new_logprobs: tuple[float, ...],
        text: str,
        finished: bool,
    ) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            new_ids,
            new_logprobs,
            text,
            finished,
            seq.finish_reason,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            seq.num_cached_tokens,
        )

    def _finish(self, seq: Sequence) -> None:
        del self._seqs[seq.request_id]
        self._texts.pop(seq.request_id, None)
        self.scheduler.finish(seq, keep_blocks=seq.prefill_only)
        if seq.prefill_only:
            self._held[seq.request_id] = seq
        elif self.hooks is not None:
            self.hooks.request_finished(seq.request_id)

    def abort(self, request_id: str) -> None:
        """End a request now and free its blocks; the next step emits its 'abort' output.

        Unknown or already finished ids are ignored; for a finished prefill-only request whose
        KV is held this is `release_kv`.
        """
        if request_id in self._held:
            self.release_kv(request_id)
            return
        seq = self._seqs.get(request_id)
        if seq is None:
            return
        self._pending += self._flush_text()  # its earlier outputs go first, with their text
        seq.finish_reason = "abort"
        text = self._visible_text(seq, self._texts[request_id], (), "abort", True)
        self._finish(seq)
        self._pending.append(self._output(seq, (), (), text, True))

    def export_kv(self, request_id: str) -> KVExport:
        """The prompt KV of a finished prefill-only request (valid until `release_kv`)."""
        seq = self._held.get(request_id)
        if seq is None:
            raise ValueError(f"request_id {request_id!r} holds no exported KV")
        return export_kv(seq, self.cache_access)

    def release_kv(self, request_id: str) -> None:
        """Free the blocks of a finished prefill-only request."""
        seq = self._held.pop(request_id, None)
        if seq is None:
            raise ValueError(f"request_id {request_id!r} holds no exported KV")
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        if self.hooks is not None:
            self.hooks.request_finished(request_id)

    def generate(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams],
    ) -> list[GenerationResult]:
        """Run `prompts` to completion (ids "gen-N", N counting every request this engine
        was given); results in prompt order."""
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(all_params) != len(prompts):
            raise ValueError(f"params has {len(all_params)} entries for {len(prompts)} prompts")
        ids = [f"gen-{self._arrivals + i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, all_params, strict=True):
            self.add_request(rid, prompt, p)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        logprobs: dict[str, list[float]] = {rid: [] for rid in ids}
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                tokens[out.request_id] += out.new_token_ids
                logprobs[out.request_id] += out.new_logprobs
                if out.finished:
                    final[out.request_id] = out
        return [
            GenerationResult(
                rid,
                tuple(prompt),
                tuple(tokens[rid]),
                tuple(logprobs[rid]),
                final[rid].text,
                final[rid].finish_reason,
            )
            for rid, prompt in zip(ids, prompts, strict=True)
        ]


# A deferred output (async_output): the sequence, its text (not yet fed this token), then
# RequestOutput's fields but text as they were when its token was sampled.
_Deferred = tuple[Sequence, TextStream, tuple[int, ...], tuple[float, ...], bool,
                  FinishReason | None, int, int, int]


def _graph_mode(config: EngineConfig, loaded: LoadedModel) -> str | None:
    """The runner's decode-graph mode; "auto" skips capture for a model that cannot be
    captured, an explicit "capture" is refused for it."""
    mode = config.graph_mode()
    if mode != "capture" or getattr(loaded.model, "graph_capturable", False):
        return mode
    if config.decode_graphs == "capture":
        raise ValueError(f"decode_graphs 'capture': model {loaded.config.architecture} cannot "
                         "be captured (its MoE layers synchronise with the host)")
    return None


def _resolved(value: int | None) -> int:
    if value is None:
        raise RuntimeError("engine config was not resolved")
    return value
