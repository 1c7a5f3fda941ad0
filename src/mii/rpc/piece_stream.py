"""The iterator a deployment client's ``stream`` returns: its pieces, and a way to end
the request that does not depend on when Python collects a generator."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class CallCanceller:
    """Cancels a streaming call from any thread: the call once it has started (the
    stream's generator sets ``call``), or, before that, as soon as it starts. The
    generator reads ``requested`` to end quietly rather than raise CANCELLED."""

    def __init__(self) -> None:
        self.call: Any = None
        self.requested = False

    def __call__(self) -> None:
        self.requested = True
        if self.call is not None:
            self.call.cancel()  # (grpc's cancel may be called from any thread)


class PieceStream(Iterator[T], Generic[T]):
    """Pieces of one answer. ``close()``, or leaving a ``with`` block over it, cancels
    the request on the server. A ``for`` loop left with ``break`` does not: the stream
    lives while a variable holds it (a user trial's ``s = client.stream(...)`` kept
    generating after the loop), so hold it in ``with client.stream(...) as pieces:``."""

    def __init__(
        self, pieces: Generator[T, None, None], cancel: Callable[[], None] | None = None
    ) -> None:
        self._pieces = pieces
        self._cancel = cancel
        self._closing = False

    def __iter__(self) -> PieceStream[T]:
        return self

    def __next__(self) -> T:
        try:
            return next(self._pieces)
        except ValueError:  # "generator already executing": closed by another thread
            if self._closing:  # (while its close() ran the generator's cleanup)
                raise StopIteration from None
            raise

    def close(self) -> None:
        """End the request now (a no-op once it has ended); from another thread too,
        while one waits for the next piece (its loop then ends)."""
        self._closing = True
        try:
            self._pieces.close()
        except ValueError:  # "generator already executing": another thread is in next()
            if self._cancel is None:
                raise
            self._cancel()

    def __enter__(self) -> PieceStream[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
