"""A client that leaves while its answer is awaited: the generation is cancelled,
and only once it has stopped does the handler go on (it then closes the stream the
generation was reading, which must not be running any more)."""

from __future__ import annotations

import asyncio

import pytest

from mii.rpc.http.disconnect import ClientDisconnected, until_disconnected


class _Request:
    def __init__(self, after_polls: int) -> None:
        self.polls = after_polls

    async def is_disconnected(self) -> bool:
        self.polls -= 1
        return self.polls < 0


async def test_a_stream_left_before_its_first_piece_closes_quietly():
    """The first piece of a stream is awaited under until_disconnected; the client
    leaves before it comes. Closing the stream afterwards works (it raised
    'aclose(): asynchronous generator is already running' while the cancelled
    __anext__ was still unwinding) and its cleanup ran."""
    cleaned = asyncio.Event()

    async def pieces():
        try:
            await asyncio.sleep(60)  # a long prefill
            yield "first"
        finally:
            await asyncio.sleep(0.01)  # cleanup that awaits, as closing a call does
            cleaned.set()

    stream = pieces()

    async def first():
        return await stream.__anext__()

    with pytest.raises(ClientDisconnected):
        await until_disconnected(_Request(after_polls=1), first())
    await stream.aclose()
    assert cleaned.is_set()


async def test_the_answer_when_the_client_stays():
    async def answer():
        await asyncio.sleep(0.01)
        return 42

    assert await until_disconnected(_Request(after_polls=100), answer()) == 42
