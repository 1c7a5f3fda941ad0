"""The iterator a deployment client's ``stream`` returns: its pieces, and a way to end
the request that does not depend on when Python collects a generator."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class PieceStream(Iterator[T], Generic[T]):
    """Pieces of one answer. ``close()``, or leaving a ``with`` block over it, cancels
    the request on the server. A ``for`` loop left with ``break`` does not: the stream
    lives while a variable holds it (a user trial's ``s = client.stream(...)`` kept
    generating after the loop), so hold it in ``with client.stream(...) as pieces:``."""

    def __init__(self, pieces: Generator[T, None, None]) -> None:
        self._pieces = pieces

    def __iter__(self) -> PieceStream[T]:
        return self

    def __next__(self) -> T:
        return next(self._pieces)

    def close(self) -> None:
        """End the request now (a no-op once it has ended)."""
        self._pieces.close()

    def __enter__(self) -> PieceStream[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
