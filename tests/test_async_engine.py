"""AsyncEngine behaviour: streaming, cancellation, abort, seeds, stops, limits,
and isolation of bad requests."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

import mii
from helpers import PROMPTS
from mii.response import join_pieces

GREEDY = {"do_sample": False}


@pytest.fixture(params=[False, True], ids=["sync", "async-scheduling"])
async def engine(llama, request):
    """Every test here runs with synchronous and with async scheduling (pass N+1
    launched before pass N's tokens are read), which CUDA uses by default."""
    options = dict(kv_block_size=4, num_kv_blocks=40, async_scheduling=request.param)
    async with mii.AsyncEngine(llama, **options) as eng:
        yield eng


def assert_all_blocks_free(engine: mii.AsyncEngine) -> None:
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["free_blocks"] == engine.core.blocks.num_blocks


async def test_stream_pieces_concatenate_to_generate(engine):
    [whole] = await engine.generate(PROMPTS[4], max_new_tokens=30, ignore_eos=True, **GREEDY)
    pieces = [
        p async for p in engine.stream(PROMPTS[4], max_new_tokens=30, ignore_eos=True, **GREEDY)
    ]
    assert "".join(p.generated_text for p in pieces) == whole.generated_text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert all(p.finish_reason is None for p in pieces[:-1])
    assert pieces[-1].finish_reason == "length" and pieces[-1].generated_length == 30
    assert len(pieces) > 5  # streamed, not delivered in one lump


async def test_streamed_text_equals_decoded_tokens(engine, tokenizer):
    for prompt in PROMPTS:
        [r] = await engine.generate(prompt, max_new_tokens=40, seed=3, ignore_eos=True)
        assert r.generated_text == tokenizer.decode(r.token_ids, skip_special_tokens=True)


async def test_cancelling_the_consumer_aborts_and_frees_blocks(engine):
    got = []

    async def consume():
        async for piece in engine.stream(PROMPTS[1], max_new_tokens=100, ignore_eos=True):
            got.append(piece)

    task = asyncio.create_task(consume())
    while len(got) < 3:
        await asyncio.sleep(0.001)
    assert engine.stats()["free_blocks"] < engine.core.blocks.num_blocks
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine.wait_idle()
    assert_all_blocks_free(engine)
    assert len(got) < 100


async def test_closing_the_iterator_aborts(engine):
    stream = engine.stream(PROMPTS[0], max_new_tokens=100, ignore_eos=True)
    await stream.__anext__()
    await stream.aclose()
    await engine.wait_idle()
    assert_all_blocks_free(engine)


async def test_abort_by_request_id(engine):
    pieces = []

    async def consume():
        async for piece in engine.stream(
            PROMPTS[2], request_id="r1", max_new_tokens=100, ignore_eos=True
        ):
            pieces.append(piece)

    task = asyncio.create_task(consume())
    while not pieces:
        await asyncio.sleep(0.001)
    await engine.abort("r1")
    await asyncio.wait_for(task, 5)  # the stream ends instead of hanging
    await engine.wait_idle()
    assert_all_blocks_free(engine)
    assert len(pieces) < 100
    # The stream ends with a final piece saying so, as generate() reports an abort.
    last = pieces[-1]
    assert last.finish_reason == "abort" and last.generated_text == "" and not last.token_ids
    assert all(p.finish_reason is None for p in pieces[:-1])
    assert last.generated_length == pieces[-2].generated_length
    assert last.prompt_length == pieces[0].prompt_length > 0
    joined = join_pieces(pieces)  # what generate() returns for an aborted request
    assert joined.finish_reason == "abort" and joined.generated_length == len(joined.token_ids)


async def test_a_request_id_is_free_again_once_abort_returns_or_its_consumer_left(engine):
    """The id of an aborted request (abort() awaited) or of a cancelled consumer may
    name a new request at once: it was refused as "in use" until the next pass."""
    long = dict(max_new_tokens=100, ignore_eos=True)
    started = asyncio.Event()

    async def consume():
        async for _ in engine.stream(PROMPTS[2], request_id="r1", **long):
            started.set()

    for end in ("abort", "cancel"):
        started.clear()
        task = asyncio.create_task(consume())
        while not started.is_set():
            if task.done():
                task.result()  # its error, rather than waiting for ever
            await asyncio.sleep(0.001)
        if end == "abort":
            await engine.abort("r1")
            await task
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        again = [p async for p in engine.stream(PROMPTS[0], request_id="r1", max_new_tokens=3)]
        assert again[-1].finish_reason is not None and again[-1].request_id == "r1"
    await engine.wait_idle()
    assert_all_blocks_free(engine)


def test_an_abort_left_pending_by_an_ended_event_loop_is_applied_by_the_next(llama):
    """A stream left at the end of one asyncio.run leaves its abort pending (the
    engine task was cancelled first); abort() and reusing the id in the next loop
    must apply it, not wait for ever."""
    engine = mii.AsyncEngine(llama, kv_block_size=4, num_kv_blocks=40)

    async def leave_early():
        async for _ in engine.stream(PROMPTS[2], request_id="a", max_new_tokens=50):
            break

    async def again():
        await asyncio.wait_for(engine.abort("a"), 30)
        pieces = [p async for p in engine.stream(PROMPTS[0], request_id="a", max_new_tokens=3)]
        assert pieces[-1].finish_reason is not None
        await engine.aclose()

    asyncio.run(leave_early())
    asyncio.run(asyncio.wait_for(again(), 60))


@pytest.mark.parametrize("run", ["asyncio", "uvloop"])
def test_a_stream_finalized_by_asyncio_run_starts_no_task_on_the_closing_loop(llama, caplog, run):
    """A stream kept past its asyncio.run is closed by the loop's shutdown of async
    generators; its abort started a new engine task on that loop, which closed with
    the task pending: "Task was destroyed but it is pending!" (a user trial). The
    next loop applies the abort."""
    import gc

    engine = mii.AsyncEngine(llama, kv_block_size=4, num_kv_blocks=40)
    kept = []

    async def first():
        kept.append(engine.stream(PROMPTS[2], max_new_tokens=50, ignore_eos=True))
        await anext(kept[0])

    async def second():
        [answer] = await engine.generate(PROMPTS[0], max_new_tokens=2)
        assert answer.generated_length == 2
        await engine.wait_idle()
        assert engine.stats()["running"] == 0 and not engine._queues
        assert_all_blocks_free(engine)
        await engine.aclose()

    caplog.set_level(logging.ERROR, logger="asyncio")
    runner = __import__(run).run  # (uvloop's loop keeps no flag Python can read)
    runner(first())
    runner(asyncio.wait_for(second(), 60))
    kept.clear()
    gc.collect()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


async def test_options_are_keywords_and_a_closed_engine_says_so(llama):
    async with mii.AsyncEngine(llama) as engine:
        params = mii.GenerateParams(max_new_tokens=3)
        with pytest.raises(TypeError, match="keyword arguments"):
            [p async for p in engine.stream(PROMPTS[0], params)]  # vLLM's habit
        # several prompts to stream (it read "a token-id prompt is a non-empty list ...")
        for several in (PROMPTS[:2], [[5, 6], [7]]):
            with pytest.raises(mii.InvalidRequestError, match="stream takes one prompt"):
                [p async for p in engine.stream(several, max_new_tokens=1)]
        [one] = [p async for p in engine.stream([[5, 6]], max_new_tokens=1)]  # a one-row batch
        assert one.prompt_length == 2
    with pytest.raises(mii.EngineClosedError):
        engine.stats()


async def test_same_seed_same_text_alone_in_batch_and_after_preemption(llama):
    params = dict(max_new_tokens=24, seed=1234, temperature=1.3, top_p=0.95, ignore_eos=True)
    async with mii.AsyncEngine(llama) as roomy:
        [alone] = await roomy.generate(PROMPTS[0], **params)
        others = [roomy.generate(p, max_new_tokens=30, seed=i) for i, p in enumerate(PROMPTS)]
        batched, *_ = await asyncio.gather(roomy.generate(PROMPTS[0], **params), *others)
        [other_seed] = await roomy.generate(PROMPTS[0], **{**params, "seed": 99})
    async with mii.AsyncEngine(
        llama, token_budget=5, max_num_seqs=4, kv_block_size=4, num_kv_blocks=28
    ) as tight:
        crowd = [
            tight.generate(p, max_new_tokens=30, seed=i, ignore_eos=True)
            for i, p in enumerate(PROMPTS)
        ]
        squeezed, *_ = await asyncio.gather(tight.generate(PROMPTS[0], **params), *crowd)
        assert tight.stats()["preemptions"] > 0
    assert batched[0].token_ids == alone.token_ids
    assert squeezed[0].token_ids == alone.token_ids
    assert other_seed.token_ids != alone.token_ids


async def test_unseeded_sampling_varies(engine):
    texts = {
        (await engine.generate(PROMPTS[0], max_new_tokens=16, temperature=1.5))[0].generated_text
        for _ in range(4)
    }
    assert len(texts) > 1


async def test_stop_string_spanning_tokens(engine, tokenizer):
    [ref] = await engine.generate(PROMPTS[1], max_new_tokens=40, ignore_eos=True, **GREEDY)
    text = ref.generated_text
    stop = text[10:17]  # several characters, likely several tokens
    cut = text.index(stop)
    pieces = [
        p
        async for p in engine.stream(
            PROMPTS[1], max_new_tokens=40, stop=[stop, "\x00never"], **GREEDY
        )
    ]
    streamed = "".join(p.generated_text for p in pieces)
    assert streamed == text[:cut]
    assert pieces[-1].finish_reason == "stop" and pieces[-1].stop_reason == stop
    assert all(p.stop_reason is None for p in pieces[:-1])
    [whole] = await engine.generate(PROMPTS[1], max_new_tokens=40, stop=stop, **GREEDY)
    assert whole.generated_text == text[:cut] and whole.finish_reason == "stop"
    assert whole.stop_reason == stop
    [kept] = await engine.generate(
        PROMPTS[1], max_new_tokens=40, stop=stop, include_stop_str_in_output=True, **GREEDY
    )
    assert kept.generated_text == text[: cut + len(stop)] and kept.stop_reason == stop
    # Of two stop strings, the one that begins first; a finish by length has none.
    later = text[cut + 2 : cut + 9]
    [first] = await engine.generate(PROMPTS[1], max_new_tokens=40, stop=[later, stop], **GREEDY)
    assert first.stop_reason == stop
    assert ref.finish_reason == "length" and ref.stop_reason is None


async def test_return_full_text(engine):
    [plain] = await engine.generate(PROMPTS[0], max_new_tokens=8, **GREEDY)
    [full] = await engine.generate(PROMPTS[0], max_new_tokens=8, return_full_text=True, **GREEDY)
    assert full.generated_text == PROMPTS[0] + plain.generated_text


async def test_eos_min_new_tokens_and_ignore_eos(engine):
    [ref] = await engine.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, **GREEDY)
    eos = ref.token_ids[3]
    first = ref.token_ids.index(eos)
    engine.core.eos_token_ids = [eos]  # pretend the model's 4th greedy token is EOS
    [stopped] = await engine.generate(PROMPTS[0], max_new_tokens=12, **GREEDY)
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None  # EOS: none
    assert stopped.token_ids == ref.token_ids[: first + 1]
    [kept_going] = await engine.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, **GREEDY)
    assert kept_going.token_ids == ref.token_ids and kept_going.finish_reason == "length"
    [at_least] = await engine.generate(PROMPTS[0], max_new_tokens=12, min_new_tokens=8, **GREEDY)
    assert eos not in at_least.token_ids[:8]
    assert at_least.generated_length >= 8


async def test_max_length_caps_prompt_plus_answer(engine):
    prompt_len = len(engine.tokenizer(PROMPTS[1]).input_ids)
    [r] = await engine.generate(PROMPTS[1], max_length=prompt_len + 5, ignore_eos=True, **GREEDY)
    assert r.generated_length == 5 and r.finish_reason == "length"
    [r] = await engine.generate(PROMPTS[1], max_length=prompt_len + 5, max_new_tokens=3, **GREEDY)
    assert r.generated_length <= 3
    [r] = await engine.generate(PROMPTS[1], max_new_tokens=0)
    assert r.generated_text == "" and r.generated_length == 0 and r.finish_reason == "length"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": float("nan")}, "temperature"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"no_such_option": 1}, "no_such_option"),
        ({"max_length": 100_000}, "max_length"),
    ],
)
async def test_bad_options_raise_and_name_the_field(engine, options, field):
    with pytest.raises(mii.InvalidRequestError) as info:
        await engine.generate(PROMPTS[0], **options)
    assert info.value.field == field and field in str(info.value)
    assert isinstance(info.value, ValueError)


async def test_prompt_too_long_and_request_too_large(engine, llama):
    with pytest.raises(mii.InvalidRequestError, match="prompt") as info:
        await engine.generate("word " * 400)
    assert info.value.field == "prompt"
    assert info.value.code == "context_length_exceeded"  # (OpenAI's code: clients branch on it)
    assert "truncate_prompt_tokens" in str(info.value)  # the way to keep its end
    assert "the engine's max_length" in str(info.value)
    # the request's own max_length was the limit: that is the one to raise
    with pytest.raises(mii.InvalidRequestError, match="the request's max_length"):
        await engine.generate("word " * 30, max_length=8)
    # max_new_tokens past the end of the whole cache (160 tokens) is clamped there, as
    # past max_length (it was refused); a prompt the cache cannot hold is refused.
    [clamped] = await engine.generate(PROMPTS[1], max_new_tokens=250, ignore_eos=True)
    assert clamped.prompt_length + clamped.generated_length == 160
    assert clamped.finish_reason == "length"
    with pytest.raises(mii.RequestTooLargeError, match="num_kv_blocks") as info:
        await engine.generate([5] * 170, max_new_tokens=2)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(mii.InvalidRequestError, match="prompt"):
        await engine.generate([999_999])


async def test_a_kv_cache_smaller_than_max_length(engine):
    """This engine's cache holds 160 tokens, under max_length 256: a request without
    max_new_tokens stops where the cache ends (it was refused, blaming max_new_tokens
    it never set), truncation keeps what fits, a longer prompt names the way out."""
    held = engine.core.blocks.num_blocks * engine.core.blocks.block_size
    assert held < engine.core.max_length
    [full] = await engine.generate([5] * 10, ignore_eos=True, **GREEDY)
    assert full.generated_length == held - 10 and full.finish_reason == "length"
    for new in (1, 16):  # -1 keeps what leaves room for one token, whatever max_new_tokens
        [cut] = await engine.generate([5] * 200, truncate_prompt_tokens=-1, max_new_tokens=new)
        assert cut.prompt_length == held - 1 and cut.generated_length == 1
    [cut] = await engine.generate(
        [5] * 200, truncate_prompt_tokens=100, max_new_tokens=100, ignore_eos=True
    )
    assert cut.prompt_length == 100 and cut.generated_length == held - 100
    with pytest.raises(mii.RequestTooLargeError) as info:
        await engine.generate([5] * 200, max_new_tokens=1)
    assert info.value.field == "prompt" and "truncate_prompt_tokens" in str(info.value)
    await engine.wait_idle()
    assert_all_blocks_free(engine)


async def test_bad_requests_do_not_disturb_others(engine):
    [expected] = await engine.generate(PROMPTS[3], max_new_tokens=30, ignore_eos=True, **GREEDY)
    good = asyncio.create_task(
        engine.generate(PROMPTS[3], max_new_tokens=30, ignore_eos=True, **GREEDY)
    )
    await asyncio.sleep(0.01)
    for bad in ({"top_p": 0}, {"max_length": 10_000}, {"stop": [""]}, {"prompt_logprobs": 99}):
        with pytest.raises(mii.InvalidRequestError):
            await engine.generate(PROMPTS[0], **bad)
    assert (await good)[0].token_ids == expected.token_ids
    await engine.wait_idle()
    assert_all_blocks_free(engine)


async def test_failed_forward_pass_fails_its_requests_and_engine_recovers(engine, monkeypatch):
    original = engine.core.runner.run
    calls = {"n": 0}

    def flaky(chunks, pending=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device error")
        return original(chunks, pending)

    monkeypatch.setattr(engine.core.runner, "run", flaky)
    with pytest.raises(RuntimeError, match="simulated device error"):
        await engine.generate(PROMPTS[0], max_new_tokens=10)
    assert_all_blocks_free(engine)
    [r] = await engine.generate(PROMPTS[0], max_new_tokens=5, ignore_eos=True)
    assert r.generated_length == 5


async def test_event_loop_stays_responsive(llama):
    async with mii.AsyncEngine(llama) as engine:
        gaps = []
        done = asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        await engine.generate(PROMPTS * 4, max_new_tokens=64, ignore_eos=True)
        done.set()
        await tick
    # Each pass runs in the worker thread: the loop keeps ticking throughout.
    assert len(gaps) > 20
    assert max(gaps) < 0.5


async def test_closed_engine_rejects_requests(llama):
    engine = mii.AsyncEngine(llama)
    await engine.aclose()
    with pytest.raises(mii.EngineClosedError):
        await engine.generate("hello")


async def test_cancelling_generate_aborts_all_its_requests(engine):
    task = asyncio.create_task(engine.generate(PROMPTS, max_new_tokens=100, ignore_eos=True))
    while engine.stats()["running"] < 2:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await engine.wait_idle()
    assert_all_blocks_free(engine)
    assert not engine._queues  # no request is left waiting for output


async def test_request_id_reused_while_its_abort_is_pending(engine, monkeypatch):
    """A cancelled request's id is reserved until its abort is applied: a new request
    under it waits for that (it was refused as "already in use"), then runs as its
    own, without the old request's output."""
    # The first pass is held until the reuse was tried, so the abort is still
    # pending then on any machine (a fast pass let the loop apply it first).
    release = threading.Event()
    step = engine.core.step

    def held_step():
        release.wait(30)
        return step()

    monkeypatch.setattr(engine.core, "step", held_step)

    async def consume(request_id):
        return [
            p
            async for p in engine.stream(
                PROMPTS[0], request_id=request_id, max_new_tokens=5, ignore_eos=True
            )
        ]

    first = asyncio.create_task(consume("X"))
    await asyncio.sleep(0)  # submitted, not yet added to the engine
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.create_task(consume("X"))
    await asyncio.sleep(0.05)
    assert not second.done()  # waiting for the abort, which the held pass delays
    release.set()
    pieces = await asyncio.wait_for(second, 30)  # a regression would hang: fail instead
    assert pieces[-1].finish_reason == "length" and pieces[-1].generated_length == 5
    assert sum(len(p.token_ids) for p in pieces) == 5  # its own tokens only
    await engine.wait_idle()
    assert_all_blocks_free(engine)


async def test_failing_output_processing_fails_only_that_request(engine, monkeypatch):
    original = engine.core.output.process_token

    def flaky(seq, token, slot, logprob=None):
        if seq.request_id == "bad":
            raise RuntimeError("cannot decode")
        return original(seq, token, slot, logprob)

    monkeypatch.setattr(engine.core.output, "process_token", flaky)

    async def consume(request_id, n):
        return [
            p
            async for p in engine.stream(
                PROMPTS[1], request_id=request_id, max_new_tokens=n, ignore_eos=True
            )
        ]

    good = asyncio.create_task(consume("good", 1))
    with pytest.raises(RuntimeError, match="cannot decode"):
        await asyncio.wait_for(consume("bad", 5), 10)
    pieces = await asyncio.wait_for(good, 10)
    assert pieces[-1].finish_reason == "length"
    await engine.wait_idle()
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": 2**70}, "top_k"),
        ({"max_new_tokens": 2**70}, "max_new_tokens"),
        ({"min_new_tokens": 2**64}, "min_new_tokens"),
        ({"max_length": 2**70}, "max_length"),
        ({"seed": 2**70}, "seed"),
    ],
)
async def test_huge_integer_options_fail_only_their_request(engine, options, field):
    """An integer beyond 64 bits is refused naming its field; it never reaches a
    forward pass, so the sampled requests beside it get the tokens they get alone."""
    normal = [dict(max_new_tokens=8, seed=i, temperature=0.8, ignore_eos=True) for i in range(4)]
    alone = [(await engine.generate(PROMPTS[i], **p))[0].token_ids for i, p in enumerate(normal)]
    tasks = [asyncio.create_task(engine.generate(PROMPTS[i], **p)) for i, p in enumerate(normal)]
    bad_options = {"max_new_tokens": 8, "seed": 9, "temperature": 0.8, **options}
    bad = asyncio.create_task(engine.generate(PROMPTS[4], **bad_options))
    with pytest.raises(mii.InvalidRequestError) as info:
        await bad
    assert info.value.field == field and field in str(info.value)
    assert [(await t)[0].token_ids for t in tasks] == alone
    await engine.wait_idle()
    assert_all_blocks_free(engine)


async def test_top_k_above_the_vocabulary_keeps_every_token(engine):
    """top_k is clipped to the vocabulary when sampling: 2**63 - 1 is plain sampling."""
    params = dict(max_new_tokens=8, seed=5, temperature=0.8, ignore_eos=True)
    [unset] = await engine.generate(PROMPTS[0], **params)
    tasks = [asyncio.create_task(engine.generate(p, **params)) for p in PROMPTS[1:4]]
    [huge] = await engine.generate(PROMPTS[0], top_k=2**63 - 1, **params)
    assert huge.token_ids == unset.token_ids
    await asyncio.gather(*tasks)


async def test_tiny_temperature_is_greedy(engine):
    [greedy] = await engine.generate(PROMPTS[2], max_new_tokens=12, ignore_eos=True, **GREEDY)
    for temperature in (1e-6, 1e-46, 5e-324):
        [r] = await engine.generate(
            PROMPTS[2], max_new_tokens=12, ignore_eos=True, seed=1, temperature=temperature
        )
        assert r.token_ids == greedy.token_ids, temperature


async def test_open_stream_returns_once_accepted_and_close_aborts(engine):
    """open_stream: a refused request raises there (nothing queued); an accepted one
    returns before any token; its pieces equal stream()'s; close() of one not read
    to its end aborts it, and close() of a finished one forgets it."""
    with pytest.raises(mii.InvalidRequestError):
        await engine.open_stream([], max_new_tokens=4)  # an empty prompt
    pieces = await engine.open_stream(PROMPTS[0], max_new_tokens=6, do_sample=False)
    try:
        read = [piece async for piece in pieces]
    finally:
        pieces.close()
    streamed = [p async for p in engine.stream(PROMPTS[0], max_new_tokens=6, do_sample=False)]
    assert join_pieces(read).token_ids == join_pieces(streamed).token_ids
    assert read[-1].finish_reason == "length"
    unread = await engine.open_stream(PROMPTS[1], max_new_tokens=200, ignore_eos=True)
    while engine.stats()["running"] < 1:
        await asyncio.sleep(0.001)
    unread.close()
    unread.close()  # idempotent
    await engine.wait_idle()
    assert_all_blocks_free(engine)
    assert not engine._queues


async def test_an_unclosed_answer_stream_holds_nothing_once_read_or_dropped(llama):
    """A stream read to its end and never closed is forgotten at its last piece, and
    one dropped unread is aborted when garbage-collected: neither keeps its admission
    slot (with max_queued_requests=2 the third request was refused on an idle engine
    for ever) nor, dropped, runs on to max_new_tokens."""
    import gc

    async with mii.AsyncEngine(llama, kv_block_size=4, max_queued_requests=2) as engine:
        for _ in range(3):
            pieces = await engine.open_stream(PROMPTS[0], max_new_tokens=3)
            assert [p async for p in pieces][-1].finish_reason is not None
            assert not engine._queues
        for _ in range(3):
            dropped = await engine.open_stream(PROMPTS[1], max_new_tokens=400, ignore_eos=True)
            del dropped
            gc.collect()
            await asyncio.sleep(0)  # (the finalizer hands the abort to this loop)
            await asyncio.wait_for(engine.wait_idle(), 60)
            assert not engine._queues
        assert_all_blocks_free(engine)
        assert engine.stats()["generation_tokens"] < 3 * 400  # (aborted, not run to the end)
        [answer] = await engine.generate(PROMPTS[0], max_new_tokens=2)
        assert answer.generated_length == 2


def test_a_stream_collected_after_its_event_loop_ended_is_released(llama):
    """A stream kept past its asyncio.run (by a caller's object, a traceback cycle)
    and collected later: its request is aborted and its slot freed by the next loop
    (its own loop's call_soon was gone: the next request was refused for ever)."""
    import gc

    engine = mii.AsyncEngine(llama, kv_block_size=4, max_queued_requests=1)
    kept = []

    async def first():
        pieces = await engine.open_stream(PROMPTS[0], max_new_tokens=300, ignore_eos=True)
        await anext(pieces)
        kept.append(pieces)

    async def second():
        [answer] = await engine.generate(PROMPTS[1], max_new_tokens=2)
        assert answer.generated_length == 2
        await engine.wait_idle()
        assert not engine._queues
        assert_all_blocks_free(engine)
        await engine.aclose()

    asyncio.run(first())
    kept.clear()
    gc.collect()
    asyncio.run(asyncio.wait_for(second(), 60))


async def test_a_finished_request_whose_stream_waits_for_the_collector_is_not_held(llama):
    """A stream left unread in a reference cycle (an exception's traceback) lives until
    the cyclic collector runs; its request, finished in the engine, no longer counts
    against max_queued_requests (an idle engine refused requests until gc.collect())."""
    import gc

    class Cycle:
        pass

    gc.disable()
    try:
        async with mii.AsyncEngine(llama, kv_block_size=4, max_queued_requests=1) as engine:
            kept = Cycle()
            kept.self, kept.pieces = kept, await engine.open_stream(PROMPTS[0], max_new_tokens=4)
            await anext(kept.pieces)
            del kept  # (alive: the cycle)
            await asyncio.wait_for(engine.wait_idle(), 60)
            [answer] = await engine.generate(PROMPTS[1], max_new_tokens=2)
            assert answer.generated_length == 2
    finally:
        gc.enable()


def test_wait_idle_runs_the_work_an_ended_event_loop_left(llama):
    """A request left generating when its asyncio.run ended: wait_idle in the next loop
    runs it to its end (it waited for ever: nothing started the engine's loop)."""
    engine = mii.AsyncEngine(llama, kv_block_size=4)
    kept = []

    async def leave_one():
        pieces = await engine.open_stream(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
        await anext(pieces)
        kept.append(pieces)

    async def then_wait():
        await asyncio.wait_for(engine.wait_idle(), 60)
        assert_all_blocks_free(engine)
        await engine.aclose()

    asyncio.run(leave_one())
    asyncio.run(then_wait())


def test_a_new_event_loop_waits_for_the_pass_an_ended_one_left_running(llama):
    """asyncio.run returns while a pass runs on the engine thread; the next loop's
    engine task touches the core (adding and aborting requests) only after it: the
    core never has two callers at once."""
    engine = mii.AsyncEngine(llama, kv_block_size=4, num_kv_blocks=200)
    # (passes long enough that the next loop starts within one)
    in_pass, overlaps = _watched_core(engine)

    async def leave_running():
        for prompt in PROMPTS:
            asyncio.get_running_loop().create_task(_drain(engine, prompt))
        while not in_pass.is_set():
            await asyncio.sleep(0.001)

    async def next_loop():
        answers = await engine.generate(PROMPTS, max_new_tokens=3)
        assert all(a.generated_length == 3 for a in answers)

    for _ in range(3):
        asyncio.run(leave_running())
        asyncio.run(asyncio.wait_for(next_loop(), 60))
    asyncio.run(engine.aclose())
    assert overlaps == []


async def _drain(engine: mii.AsyncEngine, prompt: str) -> None:
    async for _ in engine.stream(prompt, max_new_tokens=100, ignore_eos=True):
        pass


async def test_closing_an_answer_stream_wakes_its_reader(engine):
    """close() while another task waits for a piece: that reader gets the abort's
    empty piece instead of waiting forever; async with closes it too."""
    async with await engine.open_stream(PROMPTS[0], max_new_tokens=500, ignore_eos=True) as pieces:
        await anext(pieces)  # generating
        reader = asyncio.create_task(anext(pieces))
        await asyncio.sleep(0)
        pieces.close()
        ends = [await asyncio.wait_for(reader, 30)]
        ends += [p async for p in pieces]
    assert ends[-1].finish_reason == "abort"
    await engine.wait_idle()
    assert_all_blocks_free(engine)
    assert not engine._queues


async def test_queue_time_ends_where_the_first_forward_pass_starts(engine, monkeypatch):
    """Queue time is waiting, not compute: the first pass's own duration belongs to the
    time to first token only (it once counted as queueing, growing with the prompt on an
    idle engine). The slowed pass lies between the two stamps whatever the machine's speed."""
    original = engine.core.runner.run
    slow_s = 0.5

    def slow(chunks, pending=None):
        time.sleep(slow_s)
        return original(chunks, pending)

    monkeypatch.setattr(engine.core.runner, "run", slow)
    [answer] = await engine.generate(PROMPTS[0], max_new_tokens=1, **GREEDY)
    assert answer.queue_time_s >= 0
    assert answer.first_token_time_s - answer.queue_time_s >= slow_s


def test_aclose_after_the_event_loops_that_used_the_engine_were_closed(llama):
    """aclose from a new loop once the loops that ran the engine were closed (as a test
    framework's loop per test leaves them): it raised "Event loop is closed" and, the
    engine already marked closed, never released the model."""
    engine = mii.AsyncEngine(llama, kv_block_size=4)
    for _ in range(2):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(engine.generate(PROMPTS[0], max_new_tokens=2))
        loop.close()
    asyncio.run(engine.aclose())
    assert engine.core.model is None
    assert not [t for t in threading.enumerate() if t.name.startswith("mii-engine")]


def test_a_loop_resumed_after_another_ran_the_engine_gets_its_pieces_in_order(llama):
    """A loop stops while a pass runs; another loop runs the engine; the first resumes:
    its stream's pieces come in order (the first loop's task delivered the stale pass's
    pieces after newer ones, and ran beside a second engine task of its loop)."""
    engine = mii.AsyncEngine(llama, kv_block_size=4, num_kv_blocks=200)
    options = dict(max_new_tokens=12, ignore_eos=True, **GREEDY)
    [expected] = asyncio.run(engine.generate(PROMPTS[0], **options))
    in_pass, _ = _watched_core(engine)  # (passes long enough for a loop to stop within)
    first_loop = asyncio.new_event_loop()

    async def open_and_leave_a_pass_running():
        pieces = await engine.open_stream(PROMPTS[0], **options)
        got = [await anext(pieces)]
        while not in_pass.is_set():
            await asyncio.sleep(0.001)
        return pieces, got

    async def read_the_rest(pieces, got):
        got += [piece async for piece in pieces]
        tasks = [t for t in asyncio.all_tasks() if t.get_name() == "mii-engine-loop"]
        assert len(tasks) == 1
        return got

    try:
        pieces, got = first_loop.run_until_complete(open_and_leave_a_pass_running())
        asyncio.run(engine.generate(PROMPTS[1], max_new_tokens=3))
        got = first_loop.run_until_complete(asyncio.wait_for(read_the_rest(pieces, got), 60))
        lengths = [p.generated_length for p in got]
        assert lengths == sorted(lengths)
        assert [t for p in got for t in p.token_ids] == expected.token_ids
        first_loop.run_until_complete(engine.aclose())
    finally:
        first_loop.close()


async def test_a_cancelled_aclose_raises_cancelled_error_and_still_releases(llama):
    """aclose's caller cancelled while it waits for the engine task: CancelledError
    (it was swallowed), and the model is released all the same."""
    engine = mii.AsyncEngine(llama, kv_block_size=4)
    await engine.generate(PROMPTS[0], max_new_tokens=2)
    closing = asyncio.create_task(engine.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    for _ in range(1000):
        if engine.core.model is None:
            break
        await asyncio.sleep(0.01)
    assert engine.core.model is None


async def test_stream_takes_a_range_of_token_ids_as_generate_does(engine):
    ids = range(5, 12)
    [whole] = await engine.generate(ids, max_new_tokens=4, **GREEDY)
    pieces = [p async for p in engine.stream(ids, max_new_tokens=4, **GREEDY)]
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert pieces[-1].prompt_length == 7


def test_aclose_with_a_stream_left_open_in_a_closed_event_loop(llama):
    """A stream (and a reader waiting on it) left in a loop that was then closed: aclose
    from a new loop ends everything and releases the model without touching that loop."""
    engine = mii.AsyncEngine(llama, kv_block_size=4)
    kept = _leave_a_reader_waiting_in_a_closed_loop(engine)
    asyncio.run(engine.aclose())
    assert engine.core.model is None and kept


def test_a_stream_left_waiting_in_a_closed_loop_does_not_stop_the_next_loop(llama):
    """The next loop's engine task delivers to a reader of a closed loop: that request
    is aborted (delivering raised "Event loop is closed" and ended the engine task)."""
    engine = mii.AsyncEngine(llama, kv_block_size=4)
    kept = _leave_a_reader_waiting_in_a_closed_loop(engine)
    _the_next_loop_serves(engine)
    assert kept  # (held to the end: not a dropped stream, which is aborted)


def _leave_a_reader_waiting_in_a_closed_loop(engine: mii.AsyncEngine) -> list:
    """A stream generating, and a reader waiting on it, in a loop then closed (as a
    test framework's loop per test may leave them); what to keep referenced."""
    loop, kept = asyncio.new_event_loop(), []

    async def leave_a_reader_waiting():
        pieces = await engine.open_stream(PROMPTS[0], max_new_tokens=200, ignore_eos=True)
        await anext(pieces)
        kept.append((pieces, asyncio.ensure_future(anext(pieces))))
        await asyncio.sleep(0)

    loop.run_until_complete(leave_a_reader_waiting())
    loop.close()
    return kept


def _the_next_loop_serves(engine: mii.AsyncEngine) -> None:
    """A new loop gets an answer, and then every KV block is free; closes the engine."""

    async def next_loop():
        [answer] = await engine.generate(PROMPTS[1], max_new_tokens=3)
        assert answer.generated_length == 3
        await engine.wait_idle()
        assert_all_blocks_free(engine)
        await engine.aclose()

    asyncio.run(asyncio.wait_for(next_loop(), 60))


def _watched_core(engine: mii.AsyncEngine, pass_s: float = 0.05):
    """The engine's core with passes of at least ``pass_s`` (``in_pass`` set during one)
    and a record of adds and aborts made while a pass ran (``overlaps``)."""
    core, in_pass, overlaps = engine.core, threading.Event(), []
    step, add, abort = core.step, core.add, core.abort

    def slow_step():
        in_pass.set()
        try:
            time.sleep(pass_s)
            return step()
        finally:
            in_pass.clear()

    def watched(call):
        def inner(*args):
            if in_pass.is_set():
                overlaps.append(call.__name__)
            return call(*args)

        return inner

    core.step, core.add, core.abort = slow_step, watched(add), watched(abort)
    return in_pass, overlaps


def test_a_driver_that_waited_for_the_engine_thread_looks_again_before_touching_the_core(llama):
    """Loop A stops mid-pass; loop B submits and stops while its task waits for the
    engine thread; A runs again and stops mid-pass; B resumes: its task took the
    core after that wait without looking whether A had driven meanwhile, and added
    a request while A's pass ran."""
    engine = mii.AsyncEngine(llama, kv_block_size=4, num_kv_blocks=200)
    in_pass, overlaps = _watched_core(engine)
    loop_a, loop_b = asyncio.new_event_loop(), asyncio.new_event_loop()
    kept = []

    async def until_in_pass():
        while not in_pass.is_set():
            await asyncio.sleep(0.001)

    async def submit(prompt):
        kept.append(await engine.open_stream(prompt, max_new_tokens=40, ignore_eos=True))

    try:
        loop_a.run_until_complete(submit(PROMPTS[0]))
        loop_a.run_until_complete(until_in_pass())  # A stops mid-pass
        loop_b.run_until_complete(submit(PROMPTS[1]))  # B's task waits for the thread
        loop_a.run_until_complete(asyncio.sleep(0.2))  # A drives again ...
        loop_a.run_until_complete(until_in_pass())  # ... and stops mid-pass
        loop_b.run_until_complete(submit(PROMPTS[2]))  # B resumes, with an add to make
        loop_b.run_until_complete(asyncio.sleep(0.2))
        assert overlaps == []
        for loop in (loop_a, loop_b):
            loop.run_until_complete(engine.wait_idle())
        loop_b.run_until_complete(engine.aclose())
    finally:
        loop_a.close()
        loop_b.close()


def test_an_abort_waited_for_in_a_closed_loop_does_not_stop_the_next_loop(llama):
    """An abort requested in a loop that stopped mid-pass and was closed: the next
    loop's task applies it, and waking its closed loop's waiter ("Event loop is
    closed") ended that task: the next loop's requests waited for ever."""
    engine = mii.AsyncEngine(llama, kv_block_size=4, num_kv_blocks=200)
    in_pass, _ = _watched_core(engine)
    loop, kept = asyncio.new_event_loop(), []

    async def leave_an_abort_waiting():
        pieces = await engine.open_stream(PROMPTS[0], max_new_tokens=200, ignore_eos=True)
        await anext(pieces)
        while not in_pass.is_set():
            await asyncio.sleep(0.001)
        kept.append((pieces, asyncio.ensure_future(engine.abort(pieces.request_id))))
        await asyncio.sleep(0)  # the abort is queued; its caller waits for it

    loop.run_until_complete(leave_an_abort_waiting())
    loop.close()
    _the_next_loop_serves(engine)


def test_abort_in_a_new_loop_of_a_request_an_idle_closed_loop_left(llama):
    """A request finished but unread in a loop that was closed, its engine task idle:
    abort() from the next loop raised "Event loop is closed" (it woke that task)."""
    engine = mii.AsyncEngine(llama, kv_block_size=4)
    loop, kept = asyncio.new_event_loop(), []

    async def leave_it_unread():
        kept.append(await engine.open_stream(PROMPTS[0], max_new_tokens=3, ignore_eos=True))
        await engine.wait_idle()

    async def next_loop():
        await engine.abort(kept[0].request_id)
        [answer] = await engine.generate(PROMPTS[1], max_new_tokens=2)
        assert answer.generated_length == 2
        assert_all_blocks_free(engine)
        await engine.aclose()

    loop.run_until_complete(leave_it_unread())
    loop.close()
    asyncio.run(asyncio.wait_for(next_loop(), 60))


def test_a_generate_left_in_a_closed_loop_is_aborted_not_run_to_its_end(llama):
    """generate() pending when its loop was closed (not cancelled): its requests were
    generated to their end for a caller that was gone; they are aborted, as a
    stream's are."""
    engine = mii.AsyncEngine(llama, kv_block_size=4, num_kv_blocks=400)
    loop = asyncio.new_event_loop()
    left = loop.create_task(engine.generate(PROMPTS[:2], max_new_tokens=200, ignore_eos=True))

    async def until_generating():
        while engine.stats()["generation_tokens"] < 2:
            await asyncio.sleep(0.001)

    loop.run_until_complete(until_generating())
    loop.close()

    async def next_loop():
        before = engine.stats()["generation_tokens"]
        await asyncio.wait_for(engine.wait_idle(), 60)
        assert not left.done()  # (its loop is gone: it never ends)
        # the passes under way when the loop closed, and the one that found it so (the
        # whole answers were 2 x 198 more)
        assert engine.stats()["generation_tokens"] - before <= 2 * 4
        assert_all_blocks_free(engine)
        await engine.aclose()

    asyncio.run(next_loop())


def test_abort_from_a_second_running_loop_is_refused_before_it_changes_anything(llama):
    """abort() from another thread's loop while the engine's runs: it changed the
    engine's state from the wrong thread, and then raised."""
    engine = mii.AsyncEngine(llama, kv_block_size=4)
    outcome = {}

    async def main():
        pieces = await engine.open_stream(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
        await anext(pieces)

        def other_thread():
            try:
                asyncio.run(engine.abort(pieces.request_id))
            except RuntimeError as err:
                outcome["error"] = str(err)

        await asyncio.to_thread(other_thread)
        rest = [p async for p in pieces]
        outcome["finish"] = rest[-1].finish_reason
        await engine.aclose()

    asyncio.run(main())
    assert "one event loop at a time" in outcome["error"]
    assert outcome["finish"] == "length"  # not aborted: the refused call changed nothing


async def test_a_second_aclose_returns_once_the_model_is_released(llama):
    engine = mii.AsyncEngine(llama, kv_block_size=4)
    await engine.generate(PROMPTS[0], max_new_tokens=2)
    first = asyncio.create_task(engine.aclose())
    await asyncio.sleep(0)
    await engine.aclose()  # returned at once, while the first was still releasing
    assert engine.core.model is None
    await first
