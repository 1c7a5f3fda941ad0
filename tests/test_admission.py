"""Backpressure and honest failures (issue 14: item 2 and two of its Low items).

- An admission limit (``max_queued_requests``): a burst beyond it is refused at
  once with gRPC RESOURCE_EXHAUSTED / HTTP 429 and a Retry-After, never cancelled
  by gRPC's own queue limits; the admitted requests are served.
- A replica that fails while serving reaches the client as UNAVAILABLE (HTTP 503),
  which retry policies retry; INTERNAL is left for bugs.
- Cancelled, timed-out and refused requests are counted in ``/metrics``.

The deployments run on loopback with the tiny llama checkpoint; ``MII_PASS_DELAY_S``
makes every forward pass last at least PASS_DELAY_S, so that the admitted requests
of a burst are still running when the rest of it arrives, however fast the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mii
from mii.errors import EngineClosedError, ServerOverloadedError, UnavailableError
from mii.rpc import mii_pb2_grpc, registry
from mii.rpc.convert import generate_request
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.status import status_of

LIMIT = 4  # max_queued_requests of the busy deployment: it holds 4 requests at most
PASS_DELAY_S = 0.2
LONG = 12  # new tokens of a burst's request: >= 2.4 s of passes, far longer than a refusal
FOREVER = 200  # new tokens that take >= 40 s: only a cancellation ends them in a test


@dataclass
class Busy:
    client: mii.rpc.client.MiiClient
    name: str
    address: str
    url: str
    info: dict


@pytest.fixture(scope="module")
def busy(checkpoints, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("mii-cache")))
        mp.setenv("MII_PASS_DELAY_S", str(PASS_DELAY_S))
        name = f"admission-{uuid.uuid4().hex[:8]}"
        port, rest_port = free_port(), free_port()
        client = mii.serve(
            str(checkpoints("llama")[0]),
            deployment_name=name,
            port=port,
            enable_restful_api=True,
            restful_api_port=rest_port,
            max_queued_requests=LIMIT,
        )
        info = registry.lookup(name)
        try:
            yield Busy(client, name, f"127.0.0.1:{port}", f"http://127.0.0.1:{rest_port}", info)
        finally:
            client.terminate_server()


def metrics(busy: Busy) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{busy.url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


REJECTED = ("mii_requests_rejected_total", (("reason", "overloaded"),))


def rejected(busy: Busy) -> float:
    return metrics(busy)[REJECTED]


def wait_idle(busy: Busy, timeout: float = 60.0) -> None:
    """Until the replica neither runs nor queues anything (earlier tests' requests)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = busy.client.stats()
        if stats.running + stats.waiting + stats.in_flight == 0:
            return
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


# ----- the admission limit --------------------------------------------------------------


def test_burst_beyond_the_limit_is_refused_at_once_over_grpc(busy):
    """60 concurrent calls, unary and streaming, raw and through mii's client: the
    ones beyond the limit get RESOURCE_EXHAUSTED with a retry-after at once (the
    client raises ServerOverloadedError), none is CANCELLED, the admitted ones
    generate every token."""
    wait_idle(busy)
    before = rejected(busy)
    options = {"max_new_tokens": LONG, "ignore_eos": True}
    request = generate_request(["burst"], options)

    async def raw(stub: mii_pb2_grpc.MiiStub, streaming: bool):
        start = time.perf_counter()
        try:
            if streaming:
                pieces = [p async for p in stub.GenerateStream(request)]
                generated = pieces[-1].generated_length
            else:
                generated = (await stub.Generate(request)).responses[0].generated_length
        except grpc.aio.AioRpcError as err:
            metadata = dict(err.trailing_metadata() or ())
            return err.code(), time.perf_counter() - start, metadata
        assert generated == LONG
        return grpc.StatusCode.OK, time.perf_counter() - start, {}

    async def by_client(streaming: bool):
        start = time.perf_counter()
        try:
            if streaming:
                pieces = [p async for p in busy.client.astream("burst", **options)]
                generated = pieces[-1].generated_length
            else:
                generated = (await busy.client.agenerate("burst", **options))[0].generated_length
        except ServerOverloadedError as err:
            return err, time.perf_counter() - start
        assert generated == LONG
        return None, time.perf_counter() - start

    async def burst():
        async with grpc.aio.insecure_channel(busy.address) as channel:
            await channel.channel_ready()
            stub = mii_pb2_grpc.MiiStub(channel)
            calls = [raw(stub, i % 2 == 0) for i in range(40)]
            calls += [by_client(i % 2 == 0) for i in range(20)]
            return await asyncio.gather(*calls)

    results = asyncio.run(burst())
    raw_results, client_results = results[:40], results[40:]
    codes = Counter(code for code, _, _ in raw_results)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    refused = [(t, md) for code, t, md in raw_results if code != grpc.StatusCode.OK]
    served = [t for code, t, _ in raw_results if code == grpc.StatusCode.OK]
    served += [t for err, t in client_results if err is None]
    errors = [err for err, _ in client_results if err is not None]
    assert refused and served
    # The first wave is LIMIT requests; a second may start once those finish
    # (after >= 2.4 s), if the burst was still arriving then.
    assert len(served) <= 2 * LIMIT
    for _, metadata in refused:
        assert metadata["retry-after"] == "1"
        assert metadata["grpc-retry-pushback-ms"] == "1000"
    assert all(isinstance(e, mii.MiiError) and e.retry_after == 1.0 for e in errors)
    assert all("max_queued_requests=4" in str(e) for e in errors)
    # Refused at once: before any admitted request could have finished.
    assert max(t for t, _ in refused) < min(served)
    assert min(served) >= LONG * PASS_DELAY_S
    assert rejected(busy) == before + len(refused) + len(errors)


def test_burst_beyond_the_limit_gets_429_over_http(busy):
    """The same over HTTP: mii's route, OpenAI completions whole and streamed.
    Refused: 429 with Retry-After and the route's error shape; served: complete."""
    wait_idle(busy)
    before = rejected(busy)
    body = {"model": busy.info["model"], "prompt": "burst", "max_tokens": LONG}
    body["ignore_eos"] = True

    async def one(http: httpx.AsyncClient, kind: str):
        if kind == "mii":
            payload = {"prompts": "burst", "max_new_tokens": LONG, "ignore_eos": True}
            response = await http.post(f"/mii/{busy.name}", json=payload)
            return kind, response, response.text
        streaming = kind == "stream"
        async with http.stream(
            "POST", "/v1/completions", json={**body, "stream": streaming}
        ) as response:
            text = (await response.aread()).decode()
        return kind, response, text

    async def burst():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=busy.url, timeout=120, limits=limits) as http:
            kinds = ["mii", "whole", "stream"] * 14
            return await asyncio.gather(*(one(http, k) for k in kinds))

    results = asyncio.run(burst())
    statuses = Counter(r.status_code for _, r, _ in results)
    assert set(statuses) == {200, 429}, statuses
    for kind, response, text in results:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            error = json.loads(text)["error"]
            assert "max_queued_requests=4" in error["message"]
            if kind != "mii":  # OpenAI's shape of a 429
                assert error["code"] == "rate_limit_exceeded" and error["param"] is None
            continue
        if kind == "mii":
            assert json.loads(text)[0]["generated_length"] == LONG
        elif kind == "whole":
            assert json.loads(text)["usage"]["completion_tokens"] == LONG
        else:
            assert '"error"' not in text and text.rstrip().endswith("data: [DONE]")
    assert rejected(busy) == before + statuses[429]


def test_a_refused_request_counts_each_of_its_choices(busy):
    """A request of n choices refused for overload is n refused sequences in the
    metrics, as every request series counts (metrics.md); it added 1 (the refused
    choice), its siblings withdrawn uncounted (user trial). Nor is any counted as
    cancelled: their client left nothing."""
    wait_idle(busy)
    held = [
        busy.client.stream("hold", max_new_tokens=FOREVER, ignore_eos=True)
        for _ in range(LIMIT - 1)
    ]
    try:
        for stream in held:  # LIMIT - 1 admitted: the first choice of n=3 fits, not all
            next(stream)
        # (the admitted choice cannot end before the refusal: it is withdrawn)
        body = {"model": busy.info["model"], "prompt": "x", "max_tokens": FOREVER, "n": 3}
        cancelled = ("mii_requests_cancelled_total", ())
        with httpx.Client(base_url=busy.url, timeout=120) as http:
            for stream in (False, True):
                before = metrics(busy)
                response = http.post("/v1/completions", json={**body, "stream": stream})
                assert response.status_code == 429, response.text
                time.sleep(0.3)  # (withdrawn choices end as their tasks do)
                after = metrics(busy)
                assert rejected(busy) == before[REJECTED] + 3, stream
                assert after[cancelled] == before[cancelled], stream
    finally:
        for stream in held:
            stream.close()
    wait_idle(busy)


def test_more_choices_than_the_deployment_holds_are_a_400(busy):
    """n beyond max_queued_requests x replicas can never be admitted: 400 naming n
    at once, not a 429 that no retry can overcome; n at the limit is served, and so
    is a call of more prompts than the limit (one admission, as /mii's)."""
    wait_idle(busy)
    body = {"model": busy.info["model"], "prompt": "choices", "max_tokens": 1}
    with httpx.Client(base_url=busy.url, timeout=120) as http:
        for _ in range(2):  # the same every time, on an idle deployment
            response = http.post("/v1/completions", json={**body, "n": LIMIT + 1})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "n" and f"at most {LIMIT} requests" in error["message"]
        response = http.post("/v1/completions", json={**body, "n": LIMIT})
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == LIMIT
        # Many prompts, n = 1: one call, admitted whole on an idle deployment (as /mii
        # admits it); streamed, each is a request of its own: 400 naming the prompt.
        many = {**body, "prompt": ["choices"] * (2 * LIMIT)}
        response = http.post("/v1/completions", json=many)
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == 2 * LIMIT
        response = http.post("/v1/completions", json={**many, "stream": True})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "prompt"


def test_in_process_engine_refuses_beyond_its_limit(llama):
    """AsyncEngine itself: a request while it holds two is refused at once; a
    call of several prompts is admitted or refused whole; no limit by default."""
    from mii.engine.async_engine import AsyncEngine

    async def scenario():
        async with AsyncEngine(llama, max_queued_requests=2) as engine:
            # The three calls queue before the engine loop first runs: deterministic.
            calls = [engine.generate("a", max_new_tokens=2)]
            calls += [engine.generate(["b", "c", "d"], max_new_tokens=2)]  # 1 held: admitted
            calls += [engine.generate("e", max_new_tokens=2)]  # 4 held: refused
            first = await asyncio.gather(*calls, return_exceptions=True)
            streams = [engine.stream(p, max_new_tokens=2) for p in "fgh"]
            pieces = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
            for s in streams:
                await s.aclose()  # aborts the two admitted ones
            await engine.wait_idle()
            later = await engine.generate("i", max_new_tokens=2, ignore_eos=True)  # room again
        async with AsyncEngine(llama) as unlimited:
            many = await asyncio.gather(
                *(unlimited.generate(str(i), max_new_tokens=1) for i in range(50))
            )
        return first, pieces, later, many

    first, pieces, later, many = asyncio.run(scenario())
    assert [len(r) for r in first[:2]] == [1, 3]
    assert isinstance(first[2], ServerOverloadedError) and first[2].retry_after == 1.0
    assert "max_queued_requests=2" in str(first[2])
    assert [type(p) for p in pieces[:2]] == [mii.Response, mii.Response]
    assert isinstance(pieces[2], ServerOverloadedError)
    assert later[0].generated_length == 2
    assert len(many) == 50


def test_a_caller_that_left_frees_its_place_at_once(llama):
    """A call cancelled (a timeout) no longer counts against max_queued_requests, even
    before the engine loop has applied its aborts: the retry is admitted."""
    from mii.engine.async_engine import AsyncEngine

    async def scenario():
        async with AsyncEngine(llama, max_queued_requests=4) as engine:
            call = asyncio.ensure_future(
                engine.generate(["a"] * 4, max_new_tokens=50, ignore_eos=True)
            )
            while len(engine._queues) < 4:  # all four submitted
                await asyncio.sleep(0.001)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            # (no await between the cancel and the retry: the loop has applied nothing)
            retry = engine.generate("b", max_new_tokens=2, ignore_eos=True)
            return await retry

    [answer] = asyncio.run(scenario())
    assert answer.generated_length == 2


def test_a_progress_bar_does_not_change_admission(llama):
    """With a progress bar a call of several prompts is still admitted whole (each
    prompt was a call of its own, so five prompts over a limit of four failed)."""
    with mii.pipeline(llama, max_queued_requests=4) as pipe:
        for progress in (False, True):
            answers = pipe(["a"] * 5, max_new_tokens=2, progress=progress)
            assert len(answers) == 5


def test_what_on_answer_raises_generate_raises(llama):
    """AsyncEngine.generate(on_answer=...): a callback's error is not lost in the
    event loop's log (it was), and the engine serves on."""
    from mii.engine.async_engine import AsyncEngine

    seen = []

    def fails(answer):
        seen.append(answer)
        raise ValueError("the callback failed")

    async def scenario():
        async with AsyncEngine(llama) as engine:
            with pytest.raises(ValueError, match="the callback failed"):
                await engine.generate(["a", "b"], on_answer=fails, max_new_tokens=2)
            return await engine.generate("c", max_new_tokens=2, ignore_eos=True)

    [after] = asyncio.run(scenario())
    assert len(seen) == 2 and after.generated_length == 2


def test_an_async_on_answer_is_awaited_and_options_are_keywords(llama):
    """A coroutine function as on_answer never ran (a RuntimeWarning: never awaited);
    generate(prompts, {options}) generated with the default options to the end, then
    failed calling the dict (user trial: vLLM's generate(prompts, sampling_params))."""
    from mii.engine.async_engine import AsyncEngine

    seen = []

    async def records(answer):
        await asyncio.sleep(0)
        seen.append(answer.generated_text)

    async def fails(answer):
        raise ValueError("the async callback failed")

    async def scenario():
        async with AsyncEngine(llama) as engine:
            answers = await engine.generate(["a", "b"], on_answer=records, max_new_tokens=2)
            assert sorted(seen) == sorted(a.generated_text for a in answers)
            with pytest.raises(ValueError, match="the async callback failed"):
                await engine.generate(["a"], on_answer=fails, max_new_tokens=2)
            with pytest.raises(TypeError, match="generation options are keyword arguments"):
                await engine.generate(["a"], {"max_new_tokens": 2})
            return engine.stats()

    stats = asyncio.run(scenario())
    assert stats["running"] == 0 and stats["waiting"] == 0, stats


def test_an_awaited_on_answer_ends_with_a_cancelled_generate(llama):
    """generate cancelled while an earlier answer's async on_answer still ran: the
    callback ran on, unowned, and what it raised was logged as never retrieved
    (review). It is cancelled with the call."""
    from mii.engine.async_engine import AsyncEngine

    started, ended = asyncio.Event(), []

    async def slow(answer):
        started.set()
        try:
            await asyncio.sleep(60)
            ended.append("ran on")
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    async def scenario():
        async with AsyncEngine(llama) as engine:
            # the 20-token prompt reaches max_length first; the 1-token one runs on
            prompts = [[5] * 20, [5]]
            call = asyncio.ensure_future(
                engine.generate(prompts, on_answer=slow, max_length=30, ignore_eos=True)
            )
            await asyncio.wait_for(started.wait(), 60)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.sleep(0.1)  # (the callback's own cancellation runs)
            assert ended == ["cancelled"], ended  # (before asyncio.run cancels what is left)

    asyncio.run(scenario())


def test_max_queued_requests_option(checkpoints):
    path = str(checkpoints("llama")[0])
    assert DeploymentConfig.parse(path).engine_config().max_queued_requests == 1024
    config = DeploymentConfig.parse(path, max_queued_requests=8)
    assert config.engine_config().max_queued_requests == 8
    with pytest.raises(mii.InvalidRequestError) as err:
        DeploymentConfig.parse(path, max_queued_requests=0)
    assert err.value.field == "max_queued_requests"
    assert mii.EngineConfig(model=path).max_queued_requests is None  # in-process: no limit


def test_a_big_burst_is_never_cancelled(checkpoints, tmp_path):
    """2,000 concurrent unary calls at a deployment with the default limit: gRPC's
    own queue of calls not yet accepted (1,000, then random drops up to 3,000)
    used to fail some of them as CANCELLED. Now each is served or refused as
    RESOURCE_EXHAUSTED."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path))
        port = free_port()
        client = mii.serve(str(checkpoints("llama")[0]), deployment_name="flood", port=port)
    request = generate_request(["flood"], {"max_new_tokens": 2, "ignore_eos": True})

    async def flood():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = mii_pb2_grpc.MiiStub(channel)

            async def one():
                try:
                    await stub.Generate(request, timeout=300)
                except grpc.aio.AioRpcError as err:
                    return err.code(), err.details()
                return grpc.StatusCode.OK, ""

            return await asyncio.gather(*(one() for _ in range(2000)))

    try:
        results = asyncio.run(flood())
    finally:
        client.terminate_server()
    codes = Counter(code for code, _ in results)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, Counter(results)
    assert codes[grpc.StatusCode.OK] > 0


# ----- failures that a retry can overcome: UNAVAILABLE, not INTERNAL ----------------------


def test_engine_failures_of_a_replica_are_unavailable():
    """What a replica answers for its engine's exceptions: a lost tensor-parallel
    rank or a closed engine is UNAVAILABLE (retryable), an overload RESOURCE_EXHAUSTED,
    anything else (a bug) INTERNAL."""
    from mii.engine.distributed import TensorParallelError
    from mii.rpc.replica import engine_error

    lost_rank = engine_error(TensorParallelError("rank 1: RuntimeError: boom"))
    assert isinstance(lost_rank, UnavailableError) and "rank 1" in str(lost_rank)
    assert status_of(lost_rank).grpc == grpc.StatusCode.UNAVAILABLE
    assert status_of(lost_rank).http == 503
    closed = engine_error(EngineClosedError("the engine was closed"))
    assert status_of(closed).grpc == grpc.StatusCode.UNAVAILABLE
    overloaded = engine_error(ServerOverloadedError("full"))
    assert status_of(overloaded).grpc == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(overloaded).http == 429
    bug = engine_error(KeyError("oops"))
    assert status_of(bug).grpc == grpc.StatusCode.INTERNAL


class _Failed(grpc.RpcError):
    """A failed call as a client sees it."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata=()) -> None:
        self._code, self._details, self._metadata = code, details, metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._metadata


def test_the_client_raises_what_the_status_means():
    """RESOURCE_EXHAUSTED with a retry-after is ServerOverloadedError (without one,
    e.g. gRPC's message-size limit, it is not); UNAVAILABLE, and CANCELLED by the
    server (the caller's own cancellation never comes back as a status), are
    UnavailableError; INTERNAL stays a plain failure."""
    from mii.rpc.status import error_from_grpc

    code = grpc.StatusCode
    full = error_from_grpc(_Failed(code.RESOURCE_EXHAUSTED, "full", (("retry-after", "3"),)))
    assert isinstance(full, ServerOverloadedError) and full.retry_after == 3.0
    odd = error_from_grpc(_Failed(code.RESOURCE_EXHAUSTED, "full", (("retry-after", "nan"),)))
    assert odd.retry_after == 1.0
    said = (("mii-field", "prompt"), ("mii-code", "context_length_exceeded"))
    too_long = error_from_grpc(_Failed(code.INVALID_ARGUMENT, "the prompt has 9 tokens", said))
    assert (too_long.field, too_long.code) == ("prompt", "context_length_exceeded")
    assert (
        error_from_grpc(_Failed(code.INVALID_ARGUMENT, "bad", (("mii-field", "x"),))).code is None
    )
    too_big = error_from_grpc(_Failed(code.RESOURCE_EXHAUSTED, "message larger than max"))
    assert not isinstance(too_big, ServerOverloadedError)
    for status in (code.UNAVAILABLE, code.CANCELLED):
        err = error_from_grpc(_Failed(status, "Socket closed"))
        assert isinstance(err, UnavailableError) and str(err) == f"{status.name}: Socket closed"
    relayed = error_from_grpc(_Failed(code.UNAVAILABLE, "UNAVAILABLE: Socket closed"))
    assert str(relayed) == "UNAVAILABLE: Socket closed"
    bug = error_from_grpc(_Failed(code.INTERNAL, "KeyError: 'x'"))
    assert type(bug) is mii.MiiError
    # A deadline: a MiiError (caught with every other failed call) and a TimeoutError,
    # answered as a timeout when relayed (it was a bare TimeoutError, no MiiError).
    late = error_from_grpc(_Failed(code.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert isinstance(late, mii.RequestTimeoutError)
    assert isinstance(late, mii.MiiError) and isinstance(late, TimeoutError)
    assert status_of(late).grpc == code.DEADLINE_EXCEEDED and status_of(late).http == 504


def test_a_choice_answered_before_its_sibling_is_refused_counts_once():
    """A choice whose last piece had arrived, its stream not yet ended, was counted
    again with its sibling's refusal (review): answered, it is not a sibling left."""
    from mii.response import Response
    from mii.rpc.http.choices import merge_streams
    from mii.rpc.metrics import Metrics
    from mii.rpc.outcomes import counted_stream

    metrics = Metrics()
    answered = asyncio.Event()

    async def done_then_slow_end():
        yield Response("a", 1, 1, "stop")
        answered.set()
        await asyncio.sleep(3600)  # (its end-of-stream status has not come yet)

    async def refused():
        await answered.wait()
        raise ServerOverloadedError("full")
        yield  # (a generator)

    async def main() -> None:
        streams = [(0, counted_stream(done_then_slow_end(), metrics))]
        streams.append((1, counted_stream(refused(), metrics)))
        with pytest.raises(ServerOverloadedError):
            async for _ in merge_streams(streams, metrics):
                pass

    asyncio.run(main())
    rejected_total = ("mii_requests_rejected_total", {"reason": "overloaded"})
    assert metrics.registry.get_sample_value(*rejected_total) == 1


# ----- what /metrics counts -------------------------------------------------------------


def test_cancelled_and_timed_out_requests_are_counted(busy):
    """A closed gRPC stream, a gRPC deadline, an HTTP client that leaves while
    waiting and one that closes its SSE stream: each counts once as cancelled and
    as finish_reason abort, none as finished."""
    wait_idle(busy)
    start = metrics(busy)
    long = {"max_new_tokens": FOREVER, "ignore_eos": True}

    stream = busy.client.stream("cancel me", **long)
    next(stream)
    stream.close()  # cancels the call
    with pytest.raises(TimeoutError):
        busy.client.generate("time me out", timeout=0.5, **long)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{busy.url}/mii/{busy.name}", json={"prompts": "x", **long}, timeout=1.0)
    body = {"prompt": "x", "max_tokens": FOREVER, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{busy.url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
    # Leaving the block closed the connection mid-stream.

    def delta(key) -> float:
        return metrics(busy).get(key, 0.0) - start.get(key, 0.0)

    cancelled = ("mii_requests_cancelled_total", ())
    aborted = ("mii_requests_total", (("finish_reason", "abort"),))
    deadline = time.monotonic() + 30
    while delta(cancelled) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    wait_idle(busy)
    assert delta(cancelled) == 4
    assert delta(aborted) == 4
    assert delta(("mii_requests_total", (("finish_reason", "length"),))) == 0


def test_replica_that_dies_mid_stream_is_unavailable(busy):
    """Runs last: it kills the busy deployment's replica. Its streams, gRPC and SSE,
    end with UNAVAILABLE / a 503 error event (a retry can succeed elsewhere), not
    INTERNAL, and count as finish_reason error."""
    wait_idle(busy)
    start = metrics(busy)
    long = {"max_new_tokens": FOREVER, "ignore_eos": True}
    grpc_stream = busy.client.stream("die", **long)
    next(grpc_stream)
    body = {"prompt": "die", "max_tokens": FOREVER, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{busy.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        os.kill(busy.info["replica_pids"][0], signal.SIGKILL)
        with pytest.raises(UnavailableError, match="UNAVAILABLE"):
            for _ in grpc_stream:
                pass
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert error["code"] == "service_unavailable" and error["type"] == "server_error"
    failed = metrics(busy).get(("mii_requests_total", (("finish_reason", "error"),)), 0.0)
    assert failed - start.get(("mii_requests_total", (("finish_reason", "error"),)), 0.0) == 2


@pytest.mark.parametrize(
    ("limit", "replicas", "calls", "size", "never"),
    [
        (4, 1, 1, 100, False),  # one call of any size: admitted on an idle replica
        (4, 1, 4, 1, False),  # four single requests fill the limit
        (4, 1, 5, 1, True),
        (4, 1, 2, 3, False),  # holding 3 < 4: the second call of 3 still gets in
        (4, 1, 3, 2, True),  # 0, 2 < 4 admitted; holding 4 refuses the third
        (4, 1, 3, 3, True),
        (4, 2, 4, 3, False),  # two calls of 3 per replica
        (4, 2, 5, 3, True),
        (None, 1, 1000, 1000, False),  # no limit
    ],
)
def test_never_admitted_counts_calls_as_replicas_admit_them(limit, replicas, calls, size, never):
    """A replica admits a call while it holds fewer than max_queued_requests, whatever
    the call's size: it takes ceil(limit / size) calls of ``size`` requests."""
    from mii.rpc.http.state import GatewayState

    state = GatewayState(None, "d", "m", 8, None, 0, max_queued_requests=limit, replicas=replicas)
    assert state.never_admitted(calls, size) is never


def test_a_call_no_replica_can_take_says_so_in_words():
    """The only replica is unreachable (its process died; nothing listens): the call
    fails with the deployment's own NoReplicaError (HTTP 503 no_replica_available),
    saying so in words, not gRPC's "failed to connect to all addresses; ipv4:..."
    (which it was, with another code than the next call's), whole and streamed."""
    from mii.errors import NoReplicaError
    from mii.rpc.deployment import free_port
    from mii.rpc.pool import ReplicaPool

    async def scenario():
        for streamed in (False, True):
            pool = ReplicaPool([f"127.0.0.1:{free_port()}"])
            pool.replicas[0].healthy = True  # as before its process died
            with pytest.raises(NoReplicaError) as err:
                if streamed:
                    async for _ in pool.stream("hi", {"max_new_tokens": 1}, timeout=10):
                        pass
                else:
                    await pool.generate(["hi"], {"max_new_tokens": 1}, timeout=10)
            message = str(err.value)
            assert "unreachable" in message and "retry" in message, message
            assert "ipv4" not in message and "failed to connect" not in message, message
            assert not pool.replicas[0].healthy  # out of rotation until a probe answers

    asyncio.run(scenario())
