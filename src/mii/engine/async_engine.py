"""AsyncEngine: the asyncio front of the engine.

One background task (the engine loop) owns the ``EngineCore``. It applies
queued additions and aborts between passes, runs each pass in a dedicated
worker thread so that the event loop stays responsive while the model runs,
and routes each request's pieces to that request's queue. Everything that
touches the core happens either on the loop between passes or in the worker
during a pass, never both at once. (An engine used from several event loops, one
after another, has one such task per loop: engine/loop_drivers.py.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import contextlib
import functools
import os
import random
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mii.config import EngineConfig, GenerateParams
from mii.engine.admission import admit
from mii.engine.answer_callbacks import AnswerCallbacks, OnAnswer
from mii.engine.answer_stream import DONE as _DONE
from mii.engine.answer_stream import AnswerStream, StreamReleases
from mii.engine.core import EngineCore, StepOutput
from mii.engine.loop_drivers import FinishedPasses, LoopDrivers
from mii.engine.request_sinks import Aborting, Collector, end_every_request, put
from mii.engine.request_stats import TokenCounters
from mii.errors import EngineClosedError, ForkedEngineError
from mii.prompts import Prompt, one_streamed_prompt, prompt_batch
from mii.response import Response

# Text prompts at least this long are tokenized in a worker thread (the fast
# tokenizers release the GIL): a 10 MB prompt takes seconds to tokenize, and on
# the event loop it stalled every other request of the engine.
OFFLOAD_TOKENIZE_CHARS = 16 * 1024


class AsyncEngine:
    """Asynchronous text generation over one model.

    >>> engine = mii.AsyncEngine("meta-llama/Llama-2-7b-hf")
    >>> async for piece in engine.stream("DeepSpeed is", max_new_tokens=64):
    ...     print(piece.generated_text, end="")
    >>> responses = await engine.generate(["a", "b"], max_new_tokens=64)
    >>> [answer] = await engine.chat([{"role": "user", "content": "Hi!"}])

    ``chat`` and ``stream_chat`` put conversations through the model's chat template.

    Engine options (``dtype``, ``device``, ``kv_block_size``, ``num_kv_blocks``,
    ``token_budget``, ``max_num_seqs``, ``max_length``, ``load_format``, ...) are
    validated by :class:`mii.config.EngineConfig`. Loading happens in the
    constructor, which blocks. With ``max_queued_requests=N``, a request made
    while the engine holds N requests (queued or being generated) raises
    ``ServerOverloadedError`` at once.
    """

    def __init__(self, model: str, **options: Any) -> None:
        self.core = EngineCore(EngineConfig.parse(model, **options))
        self.config = self.core.config  # with the device's scheduling defaults filled in
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mii-engine")
        self._queues: dict[str, asyncio.Queue] = {}
        self._aborting = 0  # entries of _queues that are Aborting (admission skips them)
        self._ended: dict[str, object] = {}  # id -> the queue of its unread last piece
        self._pending_add: list[Any] = []
        self._pending_abort: list[str] = []
        self._drivers = LoopDrivers(self._run)  # the engine loop's task, per event loop
        self._finished = FinishedPasses()  # pass outputs not yet delivered
        self._closed = False
        self._used_in: int | None = None  # the process whose engine thread served it
        self._released = threading.Event()  # set once aclose has released the model
        self._streams = StreamReleases(
            self._queues, self._request_abort, lambda: (self._drivers.loop, self._drivers.wakeup)
        )

    # ----- public API ---------------------------------------------------------

    @property
    def tokenizer(self):
        return self.core.tokenizer

    async def stream(
        self, prompt: Prompt, request_id: str | None = None, **params: Any
    ) -> AsyncIterator[Response]:
        """Yield pieces of the answer as they are generated. Cancelling the
        consuming task (or closing the iterator) aborts the request; ``abort``
        ends the stream with an empty piece whose ``finish_reason`` is "abort".
        ``request_id`` (default: a fresh one) may be reused once its request ended."""
        pieces = await self.open_stream(prompt, request_id, **params)
        try:
            async for piece in pieces:
                yield piece
        finally:
            pieces.close()

    async def open_stream(
        self, prompt: Prompt, request_id: str | None = None, **params: Any
    ) -> AnswerStream:
        """Check and queue one request (raising what ``stream`` raises before its
        first piece) and return its pieces: returning means the engine accepted it.
        The caller must ``close()`` the stream (in a ``finally``): that aborts the
        request unless it finished."""
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(
                f"request_id must be a string (got {type(request_id).__name__}); generation "
                "options are keyword arguments: stream(prompt, max_new_tokens=64)"
            )
        prompt = one_streamed_prompt(prompt)  # a text or token ids (a tuple of ids too)
        checked = GenerateParams.parse(**params)
        grammar = await self._compile_constraint(checked)
        self._admit()
        prompt_ids = await self._tokenize_large(prompt, checked)
        await self._until_free(request_id)
        request_id, queue, seq = self._submit(
            prompt, request_id, params, prompt_ids=prompt_ids, grammar=grammar
        )

        release = functools.partial(self._streams.release, request_id, queue)
        on_drop = functools.partial(self._streams.dropped, request_id, queue)
        # No await from _submit to here: a cancelled caller cannot lose the request.
        return AnswerStream(request_id, queue, seq.prompt_len, release, on_drop)

    async def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        on_answer: OnAnswer | None = None,
        **params: Any,
    ) -> list[Response]:
        """Generate whole answers for one prompt or a list of prompts, in order. A
        prompt is a text or a list of token ids (``[1, 2, 3]`` is one prompt).
        ``on_answer`` (e.g. a progress bar's update) is called with each prompt's
        answer as it finishes, in the order they finish (awaited, if a coroutine
        function); what it raises, ``generate`` raises once every answer is in."""
        callbacks = AnswerCallbacks(on_answer) if on_answer is not None else None
        prompts = prompt_batch(prompts)
        # reject bad options (and constraints that do not compile) before anything is queued
        checked = GenerateParams.parse(**params)
        grammar = await self._compile_constraint(checked)
        self._admit()  # the whole call, before any of its prompts is queued
        loop = asyncio.get_running_loop()
        submitted: list[tuple[str, Collector]] = []
        try:
            for prompt in prompts:
                collector = Collector(loop)
                if callbacks is not None:
                    collector.done.add_done_callback(callbacks.done)
                prompt_ids = await self._tokenize_large(prompt, checked)
                request_id, _, _ = self._submit(
                    prompt, None, params, sink=collector, prompt_ids=prompt_ids, grammar=grammar
                )
                submitted.append((request_id, collector))
            # (each on_answer ran before gather's own callback: added first)
            answers = list(await asyncio.gather(*(c.done for _, c in submitted)))
            if callbacks is not None:
                await callbacks.finish()
            return answers
        finally:
            if callbacks is not None:
                callbacks.cancel()  # (a no-op once finish() has awaited them)
            for request_id, collector in submitted:  # failed, cancelled or done
                self._streams.release(request_id, collector, collector.finished)

    async def abort(self, request_id: str) -> None:
        """Stop a request (the ``request_id`` given to ``stream`` / ``open_stream``)
        and free its KV blocks. Its stream ends with an empty piece whose
        ``finish_reason`` is "abort". (A ``generate`` call ends by cancelling its task.)"""
        self._drivers.check()  # (from a second loop, in another thread: refused first)
        queue = self._queues.get(request_id)
        if queue is not None and not isinstance(queue, Aborting):
            queue.put_nowait(_DONE)
            self._request_abort(request_id, owner=queue)
        await self._until_free(request_id)  # the id may be used again on return

    async def aclose(self) -> None:
        """Abort everything, stop the loop and release the model (a second call
        returns once the first has released it)."""
        if self._closed:
            await asyncio.to_thread(self._released.wait)
            return
        self._closed = True
        if self._used_in not in (None, os.getpid()):  # a fork's copy: no engine thread
            self._released.set()  # (its parent owns the model; nothing to release here)
            return
        end_every_request(list(self._queues.values()), "the engine was closed")
        try:
            await self._drivers.stop()
        finally:  # (the model is released even when the caller is cancelled meanwhile)
            try:
                released = asyncio.wrap_future(self._executor.submit(self._release))
            except RuntimeError:  # at interpreter exit the worker may already be shut down
                released = None
                self._release()
            self._executor.shutdown(wait=False)  # (the release still runs)
        if released is not None:
            await released
            self._executor.shutdown(wait=True)  # (its thread is ending: no engine thread left)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def separate_sampling_stream(self, salt: str) -> None:
        """Draw the seeds of requests that give none from a stream of the engine's
        seed and ``salt``: the replicas of a deployment (same seed) each pass their
        own, so that two of them never sample with the same seeds."""
        self.core.intake.unseeded = random.Random(f"{self.config.seed}/{salt}")

    async def warm_up(self) -> None:
        """One tiny request before serving (kernels compiled, memory allocated), then
        the token and prefix-cache counters back to zero: ``stats()`` counts the
        requests served, as a deployment's ``/metrics`` does."""
        await self.generate("warm up", max_new_tokens=1)
        await self.run_on_engine_thread(_zero_counters, self.core)

    def stats(self) -> dict[str, float | str]:
        """Running/waiting counts, KV cache usage (0..1), free blocks, preemptions,
        tokens processed (prompt_tokens, generation_tokens: engine/request_stats.py),
        the KV pool (num_kv_blocks, kv_block_size) and max_length."""
        if self._closed:
            raise EngineClosedError("the engine was closed; create a new one")
        return self.core.stats()

    async def run_on_engine_thread(self, fn, *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine's thread, between two passes."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def wait_idle(self) -> None:
        """Return once no request is queued or running (used by tests and drains)."""
        if self._busy() and not self._closed:  # (work an ended event loop left)
            self._drivers.ensure()
        while self._busy():
            await asyncio.sleep(0.005)

    # ----- plumbing -----------------------------------------------------------

    def _busy(self) -> bool:
        return bool(
            self._pending_add or self._pending_abort or self._streams or self.core.has_work()
        )

    async def _until_free(self, request_id: str | None) -> None:
        """Wait until the abort of ``request_id`` (if one is under way: a consumer
        that left, ``abort``) has been applied, so the id names nothing."""
        entry = self._queues.get(request_id) if request_id is not None else None
        if isinstance(entry, Aborting) and not self._closed:
            # Only the engine loop applies aborts: after an event loop ended with one
            # pending, this (new) loop's engine task must run to apply it.
            self._drivers.ensure()
            await entry.applied.wait()

    async def _tokenize_large(self, prompt: Any, params: GenerateParams) -> list[int] | None:
        """The ids of a long text prompt, tokenized off the event loop; None for
        anything else (tokenized, and checked, in ``_submit``)."""
        if not isinstance(prompt, str) or len(prompt) < OFFLOAD_TOKENIZE_CHARS:
            return None
        truncating = bool(params.truncate_prompt_tokens)
        return await asyncio.to_thread(self.core.intake.tokenize, prompt, truncating)

    async def _compile_constraint(self, params: GenerateParams) -> Any:
        """The compiled grammar of the request's structured-output constraint (None
        without one), compiled in a worker thread: a large JSON schema takes long
        enough to stall every other request if compiled on the event loop.
        InvalidRequestError naming the option when it does not compile."""
        if params.constraint is None:
            return None
        grammars = self.core.intake.grammars
        cached = grammars.cached(params.constraint)
        if cached is not None:
            return cached
        return await asyncio.to_thread(grammars.get, params.constraint)

    def _admit(self) -> None:
        """ServerOverloadedError when the engine holds ``max_queued_requests``
        requests. ``_queues`` has one entry per request from its submission until
        its consumer has its end, and one per request being aborted, which does not
        count: its caller has gone (a timeout's retry must not find it still there)."""
        if self._closed:  # a closed engine says so (_submit), not that it is full
            return
        self._streams.apply_dropped()
        if (limit := self.config.max_queued_requests) is not None:
            # Nor do requests whose last piece waits for a reader (a stream kept unclosed
            # in a reference cycle until the collector runs): the engine is done with them.
            self._ended = {r: q for r, q in self._ended.items() if self._queues.get(r) is q}
            admit(len(self._queues) - self._aborting - len(self._ended), limit)

    def _submit(
        self,
        prompt,
        request_id: str | None,
        params: dict[str, Any],
        sink=None,
        prompt_ids=None,
        grammar=None,
    ) -> tuple[str, asyncio.Queue, Any]:
        if self._closed:
            raise EngineClosedError("the engine was closed; create a new one")
        # A fork copies no thread: one used here before the fork has none to run it (it
        # waited for ever); one never used can still start its own in the child.
        if self._used_in is None:
            self._used_in = os.getpid()
        elif self._used_in != os.getpid():
            raise ForkedEngineError.in_fork_of(self._used_in)
        self._drivers.ensure()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._queues:
            from mii.errors import InvalidRequestError

            raise InvalidRequestError(
                f"request id {request_id!r} is already in use", field="request_id"
            )
        seq = self.core.make_sequence(
            request_id, prompt, GenerateParams.parse(**params), prompt_ids, grammar
        )
        queue = sink if sink is not None else asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_add.append(seq)
        self._drivers.wakeup.set()
        return request_id, queue, seq

    def _request_abort(self, request_id: str, owner: object) -> None:
        """Queue an abort of the request that ``owner`` (its queue or collector)
        consumes; the id stays reserved until the loop has applied it."""
        if self._queues.get(request_id) is not owner:
            return  # that request already ended, or its id is being aborted already
        self._queues[request_id] = Aborting()
        self._aborting += 1
        self._pending_abort.append(request_id)
        if not self._closed:
            with contextlib.suppress(RuntimeError):  # (another loop runs, elsewhere)
                if not self._drivers.ended_here():  # (else the next loop's driver does)
                    self._drivers.ensure()  # this loop's driver applies it
            with contextlib.suppress(RuntimeError):  # (a wakeup of a closed loop)
                self._drivers.wakeup.set()

    async def _run(self, wakeup: asyncio.Event) -> None:
        """The engine loop of one event loop (LoopDrivers starts it)."""
        loop = asyncio.get_running_loop()
        while True:
            driving = self._drivers.take_over()
            if driving is None:  # (another loop drives)
                await wakeup.wait()
                wakeup.clear()
                continue
            if driving:
                # Another loop's task may have left a pass running on the engine
                # thread: the core is touched here only once it is done (the thread
                # runs one job at a time, in order), never by both at once.
                if not await self._on_engine_thread(loop, _nothing):
                    return
                continue  # (this loop may have stopped meanwhile, and another driven)
            self._deliver(self._finished.take())  # (in the order of their passes)
            if not self._busy():
                await wakeup.wait()
                wakeup.clear()
                continue
            self._streams.apply_dropped()
            self._apply_pending()
            if self.core.has_work() and not await self._on_engine_thread(loop, self._step):
                return

    async def _on_engine_thread(self, loop: asyncio.AbstractEventLoop, fn: Callable) -> bool:
        """Run ``fn`` on the engine thread. False when that is gone (interpreter exit
        stops it before joining threads and atexit's close): every request ends, then the
        driver, quietly (it died "never retrieved"; a call in a thread hung)."""
        try:
            await loop.run_in_executor(self._executor, fn)
        except RuntimeError:
            exiting = getattr(concurrent.futures.thread, "_shutdown", False)
            if not (exiting or getattr(self._executor, "_shutdown", False)):  # (a bug)
                raise
            end_every_request(list(self._queues.values()), "the interpreter is exiting")
            return False
        return True

    def _step(self) -> None:
        """One pass, on the engine thread; its outputs wait in ``_finished`` for
        whichever event loop's task delivers them."""
        try:
            outputs = self.core.step()
        except Exception as err:  # the core guards its own passes; this is a bug net
            outputs = [StepOutput(rid, error=err) for rid in list(self.core.sequences)]
            for rid in list(self.core.sequences):
                self.core.abort(rid)
        self._finished.add(outputs)

    def _apply_pending(self) -> None:
        adds, self._pending_add = self._pending_add, []
        aborts, self._pending_abort = self._pending_abort, []
        aborted = set(aborts)
        for seq in adds:
            if seq.request_id in aborted:
                continue
            try:
                immediate = self.core.add(seq)
            except Exception as err:
                immediate = StepOutput(seq.request_id, error=err)
            if immediate is not None:
                self._deliver([immediate])
        for request_id in aborts:
            self.core.abort(request_id)
            entry = self._queues.get(request_id)
            if isinstance(entry, Aborting):
                del self._queues[request_id]  # the id may be used again
                self._aborting -= 1
                with contextlib.suppress(RuntimeError):  # (its waiter's loop was closed)
                    entry.applied.set()

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is None:
                continue  # the consumer is gone; an abort is already queued
            if not put(queue, out.error if out.error is not None else out.piece):
                self._request_abort(out.request_id, owner=queue)  # its loop was closed
                continue
            ended = out.error is not None or (out.piece and out.piece.finish_reason is not None)
            if ended and self.config.max_queued_requests is not None:  # (for _admit)
                self._ended[out.request_id] = queue

    def _release(self) -> None:
        try:
            for request_id in list(self.core.sequences):
                self.core.abort(request_id)
            self.core.release()
        finally:
            self._released.set()


def _nothing() -> None:
    """A job for the engine thread that only waits for the jobs before it."""


def _zero_counters(core: EngineCore) -> None:
    """The token and prefix-cache counters of ``core`` back to zero (its own thread)."""
    core.counters = TokenCounters()
    core.blocks.reset_counts()
