"""``AsyncEngine.generate``'s ``on_answer``: called with each prompt's answer as it
finishes, its failures raised by ``generate`` once every answer is in."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from mii.response import Response

OnAnswer = Callable[[Response], "Awaitable[Any] | None"]


class AnswerCallbacks:
    """Hands each finished answer (not a failure) to ``on_answer``. What it raises
    goes to ``generate`` rather than to the event loop, where it would be logged and
    lost, or stop the loop; a coroutine function's calls are awaited before
    ``generate`` returns (one passed from a FastAPI app never ran)."""

    def __init__(self, on_answer: OnAnswer) -> None:
        if not callable(on_answer):  # generate(prompts, {"max_new_tokens": 8}): vLLM's habit
            raise TypeError(
                f"on_answer must be a function called with each answer (got "
                f"{type(on_answer).__name__}); generation options are keyword arguments: "
                "generate(prompts, max_new_tokens=64)"
            )
        self._on_answer = on_answer
        self._failures: list[BaseException] = []
        self._pending: list[asyncio.Future] = []

    def done(self, future: asyncio.Future) -> None:
        """The done-callback of one answer's future."""
        if future.cancelled() or future.exception() is not None:
            return
        try:
            result = self._on_answer(future.result())
            if inspect.isawaitable(result):
                self._pending.append(asyncio.ensure_future(result))
        except BaseException as err:  # (re-raised by finish)
            self._failures.append(err)

    def cancel(self) -> None:
        """Cancel the awaited calls still running (``generate`` failed or was cancelled:
        they would run on, and what they raise would be logged as never retrieved)."""
        for task in self._pending:
            task.cancel()

    async def finish(self) -> None:
        """Wait for the awaited calls; raise the first failure of any call."""
        if self._pending:
            results = await asyncio.gather(*self._pending, return_exceptions=True)
            self._failures += [r for r in results if isinstance(r, BaseException)]
        if self._failures:
            raise self._failures[0]
