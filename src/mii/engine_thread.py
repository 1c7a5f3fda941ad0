"""An AsyncEngine on an event loop of its own, in a daemon thread.

The synchronous pipeline and the Jupyter magics drive an ``AsyncEngine`` from
a thread that may already run an event loop (Jupyter's), so neither can call
``asyncio.run``: they submit coroutines to this private loop instead. The
engine is shut down cleanly when the owner closes it, is garbage-collected, or
when the interpreter exits.

A forked child has no such thread (``fork`` copies only the calling thread): a
call there raises :class:`ForkedEngineError` at once (it waited for ever:
gunicorn ``--preload``, celery's prefork pool), and the child's exit leaves the
parent's engine alone.

It needs only the engine's ``stream`` and ``aclose`` and imports only mii's
errors; it sits in the serving layer beside the pipeline (tests/test_architecture.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, Protocol

from mii.errors import ForkedEngineError

_DONE = object()
_SHUTDOWN_TIMEOUT_S = 60


class LoopClosedError(RuntimeError):
    """The engine's loop was closed before a coroutine given to it could run."""


class _Engine(Protocol):
    def stream(self, prompt: str, **params: Any) -> AsyncIterator[Any]: ...

    async def aclose(self) -> None: ...


class EngineThread:
    """Runs ``engine`` on a private event loop in a daemon thread named ``name``."""

    def __init__(self, engine: _Engine, name: str) -> None:
        self.engine = engine
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        # An owner that never calls close() still shuts the engine down cleanly at exit.
        self._finalizer = weakref.finalize(
            self, _shutdown, engine, self._loop, self._thread, self._pid
        )

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Run ``coro`` on the engine's loop; its result comes through the future,
        and cancelling the future cancels it. LoopClosedError once closed;
        ForkedEngineError in a forked child."""
        if os.getpid() != self._pid:
            coro.close()
            raise ForkedEngineError.in_fork_of(self._pid)
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # closed by another thread since the caller looked
            coro.close()
            raise LoopClosedError("the engine was closed") from None

    def wait(self, future: concurrent.futures.Future) -> Any:
        """``future``'s result. One submitted while close() stopped the loop never
        runs: LoopClosedError once the loop is closed, not a wait for ever."""
        while not future.done():
            if self._loop.is_closed():  # (nothing left to cancel it on)
                raise LoopClosedError("the engine was closed")
            concurrent.futures.wait([future], timeout=0.5)
        return future.result()

    def stream(self, prompt: str, **params: Any) -> Iterator[Any]:
        """Pieces of one answer, as the engine streams them; leaving the loop early
        (or Ctrl-C) aborts the request."""
        pieces: queue.Queue = queue.Queue()

        async def pump() -> None:
            try:
                async for piece in self.engine.stream(prompt, **params):
                    pieces.put(piece)
            except Exception as err:
                pieces.put(err)
            finally:
                pieces.put(_DONE)

        future = self.submit(pump())
        try:
            while True:
                try:
                    # A timeout, so that Ctrl-C in the caller's thread is noticed.
                    item = pieces.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            future.cancel()  # cancels the consuming task, which aborts the request

    def close(self) -> None:
        """Stop the engine (waiting for it to free its memory) and the loop."""
        self._finalizer()


def _shutdown(
    engine: _Engine, loop: asyncio.AbstractEventLoop, thread: threading.Thread, pid: int
) -> None:
    if loop.is_closed() or os.getpid() != pid:  # (a fork's copy: its parent owns it)
        return
    asyncio.run_coroutine_threadsafe(engine.aclose(), loop).result(timeout=_SHUTDOWN_TIMEOUT_S)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
