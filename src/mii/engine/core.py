"""The synchronous heart of the engine: model, KV cache, scheduler, sampler and
output processing, advanced one forward pass at a time by ``step()``.

``EngineCore`` is not thread-safe: ``AsyncEngine`` calls it from one worker
thread and never concurrently with itself.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mii.config import EngineConfig, GenerateParams
from mii.engine import distributed, heap
from mii.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher, fast_decoder
from mii.engine.distributed import TensorParallelError, TPGroup
from mii.engine.kv_cache import BlockManager, allocate_kv_tensors, choose_num_blocks
from mii.engine.model_runner import ModelRunner, PassInputs
from mii.engine.sampler import SamplingBatch, sample
from mii.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from mii.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from mii.errors import InvalidRequestError, RequestTooLargeError
from mii.models import loader
from mii.ops.attention import FP8_KV_DTYPE
from mii.ops.transfer import upload
from mii.response import Response

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One request's news from one pass: a response piece, or the error that ended it."""

    request_id: str
    piece: Response | None = None
    error: BaseException | None = None


@dataclass
class _OutputState:
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    prefix: str  # the prompt text when return_full_text, sent with the first piece
    unsent_ids: list[int] = field(default_factory=list)  # token ids not yet in a piece


@dataclass
class _Launched:
    """A pass queued on the device whose sampled tokens are not read back yet."""

    seqs: list[Sequence]  # the sequences it samples for, in row order
    slots: list[int]  # where each one's new token goes in its token_ids
    tokens: torch.Tensor  # [S] sampled tokens on the device: the next pass reads them
    host_tokens: torch.Tensor  # [S] their copy in host memory, valid once `ready`
    ready: torch.cuda.Event | None  # None: host_tokens is valid already (CPU)


def _read_back(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying sampled tokens to the host without waiting for the device."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tokens.device))  # the copy's stream
    return host, ready


class EngineCore:
    """Loads a model and serves sequences through the scheduler, one pass per ``step``."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = loader.default_device(config.device)
        self.tp: TPGroup | None = None
        if config.tensor_parallel > 1:
            self.tp = distributed.join(config.tensor_parallel, self.device.type)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", self.tp.local_rank)  # one GPU per rank
            self.tp.device = self.device
        model_dir = loader.resolve_model_dir(
            config.model, config.revision, weights=config.load_format != "dummy"
        )
        hf_config = loader.read_hf_config(model_dir)
        self.dtype = loader.choose_dtype(hf_config, config.dtype)
        torch.manual_seed(config.seed)
        self.model = loader.build_model(
            hf_config, model_dir, self.dtype, self.device, config.load_format, config.seed
        )
        self.tokenizer = loader.load_tokenizer(
            model_dir, config.tokenizer, config.trust_remote_code
        )
        self._decode = fast_decoder(self.tokenizer)
        self.vocab_size = int(hf_config["vocab_size"])
        self.max_length = self._model_max_length(config, self.model.max_positions)
        self.eos_token_ids = _eos_token_ids(hf_config, model_dir, self.tokenizer)

        self.kv_dtype = FP8_KV_DTYPE if config.kv_cache_dtype == "fp8" else self.dtype
        num_blocks = choose_num_blocks(
            self.model.kv_spec,
            config.kv_block_size,
            self.kv_dtype,
            self.device,
            requested=config.num_kv_blocks,
            memory_fraction=config.kv_cache_memory_fraction,
            cpu_bytes=config.cpu_kv_cache_bytes,
            max_length=self.max_length,
            max_num_seqs=config.max_num_seqs,
        )
        if self.tp is not None:  # every rank must index the same blocks
            num_blocks = distributed.agree_on_min(self.tp, num_blocks)
        # One block more than the pool: the scratch block that padded rows of a
        # CUDA-graph pass write into. No sequence ever owns it.
        kv_caches = allocate_kv_tensors(
            self.model.kv_spec, num_blocks + 1, config.kv_block_size, self.kv_dtype, self.device
        )
        self.blocks = BlockManager(num_blocks, config.kv_block_size)
        self.scheduler = Scheduler(self.blocks, config.token_budget, config.max_num_seqs)
        self.runner = ModelRunner(self.model, kv_caches, config.kv_block_size, self.device)
        self.sequences: dict[str, Sequence] = {}
        self.async_scheduling = (
            self.device.type == "cuda"
            if config.async_scheduling is None
            else config.async_scheduling
        )
        self._in_flight: _Launched | None = None  # async scheduling: the pass not yet read back
        self.compile_s = self._maybe_compile(config)
        self.graph_capture_s = self._maybe_capture_graphs(config, kv_caches, num_blocks)
        # Full garbage collections would walk the startup heap and idle the GPU
        # (engine/heap.py); on CUDA, where such pauses cost the most.
        self._heap_frozen = self.device.type == "cuda"
        if self._heap_frozen:
            heap.freeze_startup_heap()
        # Warm-up passes above ran on every rank in step; from now on rank 0
        # sends each pass to the others.
        if self.tp is not None and self.tp.is_driver:
            self.runner.broadcast = self._broadcast_pass
        log.info(
            "loaded %s on %s (%s), %d KV blocks of %s",
            config.model,
            self.device,
            self.dtype,
            num_blocks,
            self.kv_dtype,
        )

    def _maybe_compile(self, config: EngineConfig) -> float:
        """torch.compile the model when asked (``compile=True``); warm-up seconds."""
        if not config.compile:
            return 0.0
        from mii.ops.attention import use_triton

        if not use_triton(self.device):
            raise InvalidRequestError(
                "compile=True needs a CUDA device and the Triton attention kernels",
                field="compile",
            )
        import time

        start = time.perf_counter()
        self.runner.enable_compile()
        # Compile now, on a prompt-sized and a decode-sized pass, not on the first request.
        for length in (17, 1):
            seq = Sequence("warm-up", [1] * length, GenerateParams(), 1, 0)
            self.blocks.allocate(seq, length)
            try:
                self.runner.run([ScheduledChunk(seq, length)])
            finally:
                self.blocks.free(seq)
        return time.perf_counter() - start

    def _maybe_capture_graphs(self, config: EngineConfig, kv_caches, num_blocks: int) -> float:
        """Capture decode CUDA graphs when on CUDA and the model allows it; seconds spent."""
        from mii.ops.attention import use_triton

        # The torch reference attention loops over host-side lengths, which a graph
        # would freeze: graphs need the Triton kernels, which read lengths on the GPU.
        capturable = use_triton(self.device) and self.model.supports_cuda_graphs
        wanted = capturable if config.cuda_graphs is None else config.cuda_graphs
        if not wanted:
            return 0.0
        if not capturable:
            raise InvalidRequestError(
                "cuda_graphs=True needs a CUDA device, the Triton attention kernels "
                "(MII_ATTENTION unset or 'triton') and, for MoE models, the grouped "
                "expert kernel (MII_MOE unset or 'triton')",
                field="cuda_graphs",
            )
        from mii.engine.cuda_graphs import CudaGraphRunner

        block = config.kv_block_size
        graphs = CudaGraphRunner(
            self.model,
            self.runner.forward,
            kv_caches,
            block,
            max_batch=min(config.max_graph_batch, config.max_num_seqs),
            max_blocks_per_seq=(self.max_length + block - 1) // block,
            scratch_block=num_blocks,
            device=self.device,
        )
        seconds = graphs.capture()
        self.runner.graphs = graphs
        return seconds

    def _wait_for_ranks(self, ready: torch.cuda.Event) -> None:
        """Wait for a tensor-parallel pass without hanging on a failed rank: NCCL
        waits on the device for a rank that is gone, so watch for its reported error."""
        self.tp.check()
        next_check = time.monotonic() + 0.01
        while not ready.query():
            time.sleep(50e-6)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.01
                self.tp.poll_failure()

    def _fail(self, seqs: list[Sequence], err: BaseException) -> list[StepOutput]:
        """End the (unfinished) requests of ``seqs`` with ``err``."""
        failed = []
        for seq in seqs:
            if seq.status is SequenceStatus.FINISHED:
                continue
            self.sequences.pop(seq.request_id, None)
            self.scheduler.finish(seq, "error")
            failed.append(StepOutput(seq.request_id, error=err))
        return failed

    def _broadcast_pass(self, inputs: PassInputs, pending: torch.Tensor | None):
        self.tp.send_pass(inputs.pack(), pending if len(inputs.pending_dst) else None)
        return pending

    def serve_worker(self) -> bytes | None:
        """Ranks > 0: run the passes rank 0 sends until it ends a pipeline call
        (returns that message's payload) or stops the engine (returns None)."""

        def execute(packed, pending) -> None:
            self.runner.execute(PassInputs.unpack(packed), pending)

        return self.tp.serve(execute)

    def serve_until_stopped(self) -> None:
        """Ranks > 0: serve passes (and the ends of pipeline calls) until rank 0
        stops the engine, then release the shard and leave the group."""
        while self.serve_worker() is not None:
            pass
        self.release()
        distributed.destroy()

    @property
    def failure(self) -> str | None:
        """Why the engine can serve no more requests (a tensor-parallel rank failed)."""
        return self.tp.failure if self.tp is not None else None

    @staticmethod
    def _model_max_length(config: EngineConfig, model_max: int) -> int:
        if config.max_length is None:
            return model_max
        if config.max_length > model_max:
            raise InvalidRequestError(
                f"engine option 'max_length' ({config.max_length}) exceeds the model's "
                f"maximum sequence length ({model_max})",
                field="max_length",
            )
        return config.max_length

    # ----- requests -----------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {self.vocab_size})", field="prompt"
            )
        return list(prompt)

    def make_sequence(
        self, request_id: str, prompt: str | list[int], params: GenerateParams
    ) -> Sequence:
        """Tokenize and check one request; raises InvalidRequestError before it is queued."""
        if not isinstance(prompt, (str, list)):
            raise InvalidRequestError(
                f"a prompt must be a string or a list of token ids, not {type(prompt).__name__}",
                field="prompt",
            )
        prompt_ids = self.tokenize(prompt)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        max_length = params.max_length or self.max_length
        if max_length > self.max_length:
            raise InvalidRequestError(
                f"invalid generation option 'max_length': {max_length} exceeds the engine's "
                f"maximum of {self.max_length}",
                field="max_length",
            )
        if len(prompt_ids) >= max_length:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens, which leaves no room under "
                f"max_length={max_length}; shorten the prompt or raise max_length",
                field="prompt",
            )
        room = max_length - len(prompt_ids)
        max_new = room if params.max_new_tokens is None else min(params.max_new_tokens, room)
        total = len(prompt_ids) + max_new
        if not self.blocks.can_fit_alone(total):
            raise RequestTooLargeError(
                f"the request needs KV cache for {total} tokens (prompt {len(prompt_ids)} + "
                f"max_new_tokens {max_new}) but the whole cache holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}; lower max_new_tokens or "
                "raise num_kv_blocks",
                field="max_new_tokens",
            )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(request_id, prompt_ids, params, max_new, seed)
        prefix = ""
        if params.return_full_text:
            prefix = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)
        seq.extra["out"] = _OutputState(
            IncrementalDetokenizer(self.tokenizer, prompt_ids, self._decode),
            StopStringMatcher(params.stop),
            prefix,
        )
        return seq

    def add(self, seq: Sequence) -> StepOutput | None:
        """Queue a checked sequence. A request for zero new tokens ends at once."""
        if seq.max_new_tokens == 0:
            state: _OutputState = seq.extra["out"]
            return StepOutput(
                seq.request_id, Response(state.prefix, seq.prompt_len, 0, "length", seq.request_id)
            )
        if seq.request_id in self.sequences:
            raise InvalidRequestError(
                f"request id {seq.request_id!r} is already running", field="request_id"
            )
        self.sequences[seq.request_id] = seq
        self.scheduler.add(seq)
        return None

    def abort(self, request_id: str) -> bool:
        """End a request and free its blocks; False if it is not known (already done)."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    # ----- one pass -----------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Run one forward pass; return what each request produced.

        Synchronous scheduling runs pass N and reads its tokens back before it
        returns. Async scheduling launches pass N+1 first and then reads back
        pass N, so the host work of both (scheduling, input preparation, output
        processing) overlaps the device's work on N+1. A request that ends at
        pass N (end-of-sequence, a stop string) has then been given one more
        token in N+1, which is discarded.
        """
        prev, self._in_flight = self._in_flight, None
        outputs: list[StepOutput] = []
        plan = self.scheduler.schedule()
        launched = self._launch(plan, prev, outputs) if plan.chunks else None
        if prev is not None:
            try:
                outputs.extend(self._resolve(prev))
            except TensorParallelError as err:  # a rank failed while the pass ran
                outputs.extend(self._fail(prev.seqs, err))
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs.extend(self._resolve(launched))
        return outputs

    def _launch(
        self, plan: SchedulerOutput, prev: _Launched | None, failed: list[StepOutput]
    ) -> _Launched | None:
        """Queue the forward pass and sampling of ``plan`` on the device without
        waiting for them; on failure end the plan's requests (into ``failed``)."""
        try:
            logits = self.runner.run(plan.chunks, prev.tokens if prev is not None else None)
            to_sample = [c.seq for c in plan.chunks if c.samples]
            tokens = self._sample(logits, to_sample)
            host_tokens, ready = _read_back(tokens)
        except Exception as err:  # a failed pass ends its own requests, not the engine
            log.exception("forward pass failed")
            if self.tp is not None:
                # The other ranks may be stuck in a collective of this pass: the group
                # is unusable. Report the failing rank's own error, and leave the
                # group so that the other ranks' collectives fail instead of waiting.
                err = self.tp.failed(err)
                distributed.abort()
            failed.extend(self._fail([c.seq for c in plan.chunks], err))
            return None
        self.scheduler.commit(plan)
        slots = []
        for row, seq in enumerate(to_sample):
            slots.append(len(seq.token_ids))
            seq.token_ids.append(PENDING_TOKEN)
            seq.pending_row = row
        return _Launched(to_sample, slots, tokens, host_tokens, ready)

    def _resolve(self, launched: _Launched) -> list[StepOutput]:
        """Wait for a launched pass's tokens and turn them into response pieces."""
        if launched.ready is not None:
            if self.tp is None:
                launched.ready.synchronize()  # the pass's one host sync
            else:
                self._wait_for_ranks(launched.ready)
        tokens = launched.host_tokens.tolist()
        outputs = []
        for seq, slot, token in zip(launched.seqs, launched.slots, tokens):
            seq.token_ids[slot] = token
            if seq.pending_row is not None and slot == len(seq.token_ids) - 1:
                seq.pending_row = None  # no later pass has sampled after it
            if seq.status is SequenceStatus.FINISHED:
                continue  # ended (stop, abort) after this pass was launched: discard
            try:
                outputs.append(StepOutput(seq.request_id, self._process_token(seq, token, slot)))
            except Exception as err:  # e.g. a tokenizer that cannot decode this id
                log.exception("output processing failed for request %s", seq.request_id)
                seq.finish_reason = "error"
                outputs.append(StepOutput(seq.request_id, error=err))
            if seq.finish_reason is not None:
                self.sequences.pop(seq.request_id, None)
                self.scheduler.finish(seq, seq.finish_reason)
        return outputs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Next token of each sequence. The common all-greedy case is one argmax,
        decided on the host so that no device value is read to choose the path."""
        plain_greedy = all(
            s.params.greedy and (s.params.ignore_eos or s.num_generated >= s.params.min_new_tokens)
            for s in seqs
        )
        if plain_greedy:
            return logits.argmax(dim=-1)
        return sample(logits, self._sampling_batch(seqs), self.eos_token_ids)

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        ps = [s.params for s in seqs]
        greedy = [p.greedy for p in ps]
        ban_eos = [
            not p.ignore_eos and s.num_generated < p.min_new_tokens for s, p in zip(seqs, ps)
        ]
        columns = upload(
            self.device,
            [
                (greedy, torch.bool),
                (
                    [1.0 if p.greedy or p.temperature is None else p.temperature for p in ps],
                    torch.float32,
                ),
                ([p.top_k or self.vocab_size for p in ps], torch.int64),
                ([p.top_p for p in ps], torch.float32),
                ([s.seed for s in seqs], torch.int64),
                ([s.num_generated for s in seqs], torch.int64),
                (ban_eos, torch.bool),
            ],
        )
        return SamplingBatch(
            *columns,
            greedy_host=all(greedy),
            ban_eos_host=any(ban_eos),
        )

    def _process_token(self, seq: Sequence, token: int, slot: int) -> Response:
        """Detokenize the new token at ``seq.token_ids[slot]``, check every end
        condition, and build the piece to stream (its text may be empty while
        characters are held back)."""
        state: _OutputState = seq.extra["out"]
        params = seq.params
        generated = slot + 1 - seq.prompt_len  # later tokens may already be pending
        state.unsent_ids.append(token)
        finish = None
        if token in self.eos_token_ids and not params.ignore_eos:
            finish = "stop"
            delta = state.detokenizer.flush()
        else:
            at_limit = generated >= seq.max_new_tokens
            delta = state.detokenizer.add(token, final=at_limit)
            if at_limit:
                finish = "length"
        text, hit_stop = state.stops.feed(delta, check=generated >= params.min_new_tokens)
        if hit_stop:
            finish = "stop"
        elif finish is not None:
            text += state.stops.flush()
        seq.finish_reason = finish
        if state.prefix:
            text, state.prefix = state.prefix + text, ""
        # Every new token makes a piece, even when its text is still held back (a
        # split character, a possible stop string): consumers see token timing
        # as it happens, and the pieces' text still concatenates to the answer.
        ids, state.unsent_ids = state.unsent_ids, []
        return Response(text, seq.prompt_len, generated, finish, seq.request_id, ids)

    def release(self) -> None:
        """Drop the model and KV cache so that their memory can be reclaimed; rank 0
        of a tensor-parallel engine also ends the other ranks' loops."""
        self._in_flight = None
        if self.tp is not None and self.tp.is_driver:
            self.tp.stop()
        self.runner.kv_caches.clear()
        self.runner.model = None
        self.model = None
        if self._heap_frozen:
            heap.thaw_startup_heap()
            self._heap_frozen = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----- introspection ------------------------------------------------------

    def stats(self) -> dict[str, float]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.blocks.usage,
            "free_blocks": self.blocks.num_free,
            "preemptions": self.scheduler.num_preemptions,
        }


def _eos_token_ids(hf_config: dict, model_dir: Path, tokenizer) -> list[int]:
    """Every id that ends generation: from config.json, generation_config.json and the tokenizer."""
    ids: set[int] = set()

    def take(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    take(hf_config.get("eos_token_id"))
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        import json

        take(json.loads(gen_file.read_text()).get("eos_token_id"))
    take(getattr(tokenizer, "eos_token_id", None))
    return sorted(ids)
