"""The synchronous heart of the engine: the step loop, one forward pass per ``step()``.

``EngineCore`` brings the engine up (``engine/bring_up.py``) and then drives
its parts: requests come in through ``engine/intake.py``, the scheduler plans
each pass, the model runner runs it, ``engine/sampler.py`` samples its next
tokens, and ``engine/output_processor.py`` turns them into response pieces.
With tensor parallelism, ``engine/tp_relay.py`` carries the passes to the
other ranks.

``EngineCore`` is not thread-safe: ``AsyncEngine`` calls it from one worker
thread and never concurrently with itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

import mii.envs as envs
from mii.config import EngineConfig, GenerateParams
from mii.engine import bring_up, grammar_mask, heap
from mii.engine.distributed import TensorParallelError
from mii.engine.intake import RequestIntake
from mii.engine.kv_cache import BlockManager
from mii.engine.logprobs import LogprobTensors, prompt_span
from mii.engine.model_runner import ModelRunner
from mii.engine.output_processor import OutputProcessor
from mii.engine.prefix_hash import cache_salt
from mii.engine.request_stats import TokenCounters, count_token, mark_scheduled, stamp_times
from mii.engine.sampler import sample_next_tokens
from mii.engine.scheduler import Scheduler, SchedulerOutput
from mii.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from mii.engine.tp_relay import PassRelay
from mii.errors import InvalidRequestError
from mii.response import Response

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One request's news from one pass: a response piece, or the error that ended it."""

    request_id: str
    piece: Response | None = None
    error: BaseException | None = None


@dataclass
class _Launched:
    """A pass queued on the device whose sampled tokens are not read back yet."""

    seqs: list[Sequence]  # the sequences it samples for, in row order
    slots: list[int]  # where each one's new token goes in its token_ids
    tokens: torch.Tensor  # [S] sampled tokens on the device: the next pass reads them
    host_tokens: torch.Tensor  # [S] their copy in host memory, valid once `ready`
    ready: torch.cuda.Event | None  # None: host_tokens is valid already (CPU)
    # logprobs: of the sampled tokens (rows as `seqs`), and of the prompt tokens
    # the pass scored (rows as the spans of `prompt_spans`, in order); host copies.
    token_logprobs: LogprobTensors | None = None
    prompt_logprobs: LogprobTensors | None = None
    prompt_spans: list[tuple[Sequence, range]] | None = None
    resolved: bool = False  # read back already (structured output: _launch)


def _read_back(
    tokens: torch.Tensor, *logprobs: LogprobTensors | None
) -> tuple[torch.Tensor, list[LogprobTensors | None], torch.cuda.Event | None]:
    """Start copying sampled tokens (and logprobs) to the host without waiting for
    the device."""
    if tokens.device.type != "cuda":
        return tokens, list(logprobs), None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    host_logprobs = [lp.to_host() if lp is not None else None for lp in logprobs]
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tokens.device))  # the copies' stream
    return host, host_logprobs, ready


def _score_prompts(plan: SchedulerOutput) -> list[tuple[Sequence, range]]:
    """The prompt tokens a launched pass scores, per sequence, in the order of its
    prompt rows (as ``describe_pass`` laid them out); marks them scored."""
    spans = []
    for chunk in plan.chunks:
        seq = chunk.seq
        if seq.params.prompt_logprobs is None:
            continue
        span = prompt_span(seq, seq.num_computed, chunk.num_tokens)
        if span:
            spans.append((seq, span))
            seq.prompt_scored_upto = span.stop
    return spans


class EngineCore:
    """Loads a model and serves sequences through the scheduler, one pass per ``step``."""

    def __init__(self, config: EngineConfig) -> None:
        # Bring-up, one step at a time (engine/bring_up.py).
        self.device, self.tp = bring_up.join_group(config)
        bring_up.bound_prompt_attention_plans()
        loaded = bring_up.load_model(config, self.device)
        # token_budget / max_num_seqs left unset: chosen for the device and the model
        self.config = config = bring_up.scheduling_defaults(config, loaded, self.device)
        self.model, self.tokenizer, self.dtype = loaded.model, loaded.tokenizer, loaded.dtype
        self.vocab_size, self.max_length = loaded.vocab_size, loaded.max_length
        kv_cache = bring_up.allocate_kv_cache(config, loaded, self.device, self.tp)
        self.kv_dtype = kv_cache.dtype

        # The parts that serve requests.
        self.blocks = BlockManager(
            kv_cache.num_blocks,
            config.kv_block_size,
            prefix_caching=bring_up.prefix_caching_allowed(config, self.model),
            cache_salt=cache_salt(
                config.model, config.revision, str(self.dtype), str(self.kv_dtype)
            ),
        )
        self.scheduler = Scheduler(
            self.blocks,
            config.token_budget,
            config.max_num_seqs,
            rope_recompute_at=self.model.rope_recompute_at,
            short_prompt_reserve=config.short_prompt_reserve,
        )
        self.runner = ModelRunner(self.model, kv_cache.tensors, config.kv_block_size, self.device)
        self.intake = RequestIntake(
            self.tokenizer,
            self.vocab_size,
            self.max_length,
            self.blocks,
            loaded.eos_token_ids,
            seed=config.seed,
        )
        self.output = OutputProcessor(self.tokenizer, loaded.eos_token_ids)
        self.relay = PassRelay(self.tp, self.runner) if self.tp is not None else None
        self.sequences: dict[str, Sequence] = {}
        self.async_scheduling = (
            self.device.type == "cuda"
            if config.async_scheduling is None
            else config.async_scheduling
        )
        self._in_flight: _Launched | None = None  # async scheduling: the pass not yet read back
        self._pass_delay_s = envs.PASS_DELAY_S.get()  # fault injection (tests): a slow device
        self.counters = TokenCounters()  # for throughput (engine/request_stats.py)

        # Warm-up: passes that run on every rank by themselves, then the heap freeze.
        self.compile_s = bring_up.compile_model(config, self.runner, self.blocks)
        self.graph_capture_s = bring_up.capture_graphs(
            config, self.runner, kv_cache, self.max_length
        )
        self._heap_frozen = bring_up.freeze_heap(self.device)
        if self.relay is not None and self.tp.is_driver:
            self.relay.start_sending()  # from now on rank 0 sends each pass to the others
        log.info(
            "loaded %s on %s (%s), %d KV blocks of %s",
            config.model,
            self.device,
            self.dtype,
            kv_cache.num_blocks,
            self.kv_dtype,
        )
        log.info("engine settings: %s", self.settings_line())
        bring_up.warn_if_pool_short(self.blocks.num_tokens, self.max_length)

    def settings_line(self) -> str:
        """What the engine chose where the caller left it open (scheduling defaults,
        graphs, async scheduling), for the startup log: a benchmark or a deployment
        log then says what it ran with."""
        config = self.config
        graphs = self.runner.graphs
        sizes = graphs.sizes if graphs is not None else []
        graph_text = f"{len(sizes)} sizes, 1-{sizes[-1]} rows" if sizes else "off"
        return (
            f"token_budget={config.token_budget}, max_num_seqs={config.max_num_seqs}, "
            f"short_prompt_reserve={config.short_prompt_reserve}, "
            f"cuda_graphs={graph_text}, async_scheduling={self.async_scheduling}, "
            f"quantization={self.model.weight_quantization}, "
            f"kv_cache_dtype={config.kv_cache_dtype}, "
            f"prefix_caching={'on' if self.blocks.prefix_caching else 'off'}"
        )

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation (sampling bans them below min_new_tokens)."""
        return self.output.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: list[int]) -> None:
        self.output.eos_token_ids, self.intake.eos_token_ids = ids, frozenset(ids)

    # ----- tensor parallelism: ranks > 0 (engine/tp_relay.py) -----------------

    def serve_worker(self) -> bytes | None:
        """Ranks > 0: run the passes rank 0 sends until it ends a pipeline call
        (returns that message's payload) or stops the engine (returns None)."""
        return self.relay.serve()

    def serve_until_stopped(self) -> None:
        """Ranks > 0: serve passes (and the ends of pipeline calls) until rank 0
        stops the engine, then release the shard and leave the group."""
        while self.serve_worker() is not None:
            pass
        self.leave_group()

    def leave_group(self) -> None:
        """Ranks > 0, after rank 0's STOP: release the shard and leave the group."""
        self.release()
        self.tp.leave()

    @property
    def failure(self) -> str | None:
        """Why the engine can serve no more requests (a tensor-parallel rank failed)."""
        return self.tp.failure if self.tp is not None else None

    # ----- requests -----------------------------------------------------------

    def make_sequence(
        self,
        request_id: str,
        prompt: str | list[int],
        params: GenerateParams,
        prompt_ids: list[int] | None = None,
        grammar=None,
    ) -> Sequence:
        """Tokenize and check one request; raises InvalidRequestError before it is queued.
        ``prompt_ids``: the text prompt's ids when the caller tokenized it already;
        ``grammar``: its constraint, compiled already (engine/constraints.py)."""
        return self.intake.make_sequence(request_id, prompt, params, prompt_ids, grammar)

    def add(self, seq: Sequence) -> StepOutput | None:
        """Queue a checked sequence. A request for zero new tokens ends at once."""
        if seq.max_new_tokens == 0:
            prefix = self.output.full_text_prefix(seq)
            return StepOutput(
                seq.request_id, Response(prefix, seq.prompt_len, 0, "length", seq.request_id)
            )
        if seq.request_id in self.sequences:
            raise InvalidRequestError(
                f"request id {seq.request_id!r} is already running", field="request_id"
            )
        self.output.start(seq)
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return None

    def abort(self, request_id: str) -> bool:
        """End a request and free its blocks; False if it is not known (already done)."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return False
        self._end(seq, "abort")
        return True

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    def _end(self, seq: Sequence, reason: str) -> None:
        """Forget a request: free its blocks and drop its output state."""
        self.sequences.pop(seq.request_id, None)
        self.scheduler.finish(seq, reason)
        self.output.end(seq.request_id)

    def _fail(self, seqs: list[Sequence], err: BaseException) -> list[StepOutput]:
        """End the (unfinished) requests of ``seqs`` with ``err``."""
        failed = []
        for seq in seqs:
            if seq.status is SequenceStatus.FINISHED:
                continue
            self._end(seq, "error")
            failed.append(StepOutput(seq.request_id, error=err))
        return failed

    # ----- one pass -----------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Run one forward pass; return what each request produced.

        Synchronous scheduling runs pass N and reads its tokens back before it
        returns. Async scheduling launches pass N+1 first and then reads back
        pass N, so the host work of both (scheduling, input preparation, output
        processing) overlaps the device's work on N+1. A request that ends at
        pass N (end-of-sequence, a stop string) has then been given one more
        token in N+1, which is discarded. Structured output: when N+1 samples a
        constrained row, N is read back between N+1's forward and its sampling
        (the grammar masks need N's tokens; ``_launch``).
        """
        prev, self._in_flight = self._in_flight, None
        outputs: list[StepOutput] = []
        if self._pass_delay_s:
            time.sleep(self._pass_delay_s)
        plan = self.scheduler.schedule()
        launched = self._launch(plan, prev, outputs) if plan.chunks else None
        if prev is not None and not prev.resolved:
            outputs.extend(self._resolve_guarded(prev))
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs.extend(self._resolve(launched))
        return outputs

    def _resolve_guarded(self, launched: _Launched) -> list[StepOutput]:
        """``_resolve``, ending the pass's requests if a tensor-parallel rank failed."""
        try:
            return self._resolve(launched)
        except TensorParallelError as err:  # a rank failed while the pass ran
            return self._fail(launched.seqs, err)

    def _launch(
        self, plan: SchedulerOutput, prev: _Launched | None, failed: list[StepOutput]
    ) -> _Launched | None:
        """Queue the forward pass and sampling of ``plan`` on the device without
        waiting for them; on failure end the plan's requests (into ``failed``).

        Structured output: when the pass samples a constrained row and ``prev`` is
        in flight, ``prev`` is resolved between this pass's forward and its
        sampling (into ``failed``): the grammar masks need ``prev``'s tokens, and
        reading them waits only for ``prev`` (earlier on the stream), so the masks
        are computed while this pass's forward runs on the device."""
        # Queue time ends where the pass starts, not after it: the forward (synchronous on a
        # CPU) is compute, and counted as queueing it grew with the prompt on an idle engine.
        mark_scheduled([c.seq for c in plan.chunks])
        try:
            # the in-flight pass's tokens: inputs of this pass, counted by penalties
            pending = prev.tokens if prev is not None else None
            logits, prompt_logprobs = self.runner.run(plan.chunks, pending)
        except Exception as err:  # a failed pass ends its own requests, not the engine
            return self._launch_failed(plan, err, failed)
        to_sample = [c.seq for c in plan.chunks if c.samples]
        spans = _score_prompts(plan) if prompt_logprobs is not None else None
        self.scheduler.commit(plan)  # before prev's resolve may end one of its sequences
        if prev is not None and grammar_mask.any_constrained(to_sample):
            failed.extend(self._resolve_guarded(prev))
            prev.resolved = True
        try:
            tokens, token_logprobs = sample_next_tokens(
                logits, to_sample, self.eos_token_ids, self.vocab_size, pending
            )
            host_tokens, (token_logprobs, prompt_logprobs), ready = _read_back(
                tokens, token_logprobs, prompt_logprobs
            )
        except Exception as err:
            return self._launch_failed(plan, err, failed)
        slots = []
        for row, seq in enumerate(to_sample):
            slots.append(len(seq.token_ids))
            seq.token_ids.append(PENDING_TOKEN)
            seq.pending_row = row
        return _Launched(
            to_sample, slots, tokens, host_tokens, ready, token_logprobs, prompt_logprobs, spans
        )

    def _launch_failed(
        self, plan: SchedulerOutput, err: Exception, failed: list[StepOutput]
    ) -> None:
        log.exception("forward pass failed")
        if self.relay is not None:  # the group is unusable now
            err = self.relay.failed(err)
        failed.extend(self._fail([c.seq for c in plan.chunks], err))

    def _resolve(self, launched: _Launched) -> list[StepOutput]:
        """Wait for a launched pass's tokens and turn them into response pieces."""
        if launched.ready is not None:
            if self.relay is None:
                launched.ready.synchronize()  # the pass's one host sync
            else:
                self.relay.wait(launched.ready)
        tokens = launched.host_tokens.tolist()
        if launched.prompt_logprobs is not None:  # before the first token's piece
            self.output.add_prompt_logprobs(launched.prompt_spans, launched.prompt_logprobs)
        logprobs = launched.token_logprobs.as_lists() if launched.token_logprobs else None
        process_token = self.output.process_token
        outputs = []
        for row, (seq, slot, token) in enumerate(zip(launched.seqs, launched.slots, tokens)):
            seq.token_ids[slot] = token
            if seq.pending_row is not None and slot == len(seq.token_ids) - 1:
                seq.pending_row = None  # no later pass has sampled after it
            if seq.status is SequenceStatus.FINISHED:
                continue  # ended (stop, abort) after this pass was launched: discard
            count_token(self.counters, seq)
            k = seq.params.logprobs
            logprob = logprobs.entry(row, token, k) if k is not None else None
            try:
                if seq.grammar is not None and grammar_mask.accept(seq, token):
                    piece = process_token(seq, token, slot, logprob, grammar_done=True)
                else:
                    piece = process_token(seq, token, slot, logprob)
                if piece.finish_reason is not None:
                    stamp_times(piece, seq)
                outputs.append(StepOutput(seq.request_id, piece))
            except InvalidRequestError as err:  # the request's own constraint, not a fault
                log.info("request %s ended: %s", seq.request_id, err)
                seq.finish_reason = "error"
                outputs.append(StepOutput(seq.request_id, error=err))
            except Exception as err:  # e.g. a tokenizer that cannot decode this id
                log.exception("output processing failed for request %s", seq.request_id)
                seq.finish_reason = "error"
                outputs.append(StepOutput(seq.request_id, error=err))
            if seq.finish_reason is not None:
                self._end(seq, seq.finish_reason)
        return outputs

    def release(self) -> None:
        """Drop the model and KV cache so that their memory can be reclaimed; rank 0
        of a tensor-parallel engine also ends the other ranks' loops."""
        self._in_flight = None
        if self.tp is not None and self.tp.is_driver:
            self.tp.stop()
        self.runner.release()
        self.model = None
        if self._heap_frozen:
            heap.thaw_startup_heap()
            self._heap_frozen = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        heap.return_freed_memory()

    # ----- introspection ------------------------------------------------------

    def stats(self) -> dict[str, float | str]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.blocks.usage,
            "free_blocks": self.blocks.num_free,
            "preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": self.counters.prompt_tokens,
            "generation_tokens": self.counters.generation_tokens,
            "num_kv_blocks": self.blocks.num_blocks,
            "kv_block_size": self.config.kv_block_size,
            "max_length": self.max_length,
            "quantization": self.model.weight_quantization,
            "kv_cache_dtype": bring_up.kv_cache_dtype_name(self.kv_dtype),
            # prompt tokens looked up in the prefix cache, and those found there
            "prefix_cache_queries": self.blocks.query_tokens,
            "prefix_cache_hits": self.blocks.hit_tokens,
        }
