"""Standard output and error that outlast their reader.

``mii serve`` prints as it runs: to a terminal, or into a pipe (``mii serve | tee
log``). Ctrl-C reaches the whole process group, so ``tee`` dies with it, and a
closed terminal or SSH session leaves a terminal that fails every write (EIO).
The deployment then drains, printing as it goes: each print raised (EPIPE, EIO),
which broke the drain and cut the streams it was letting finish. Wrapped here, the
first failed write points the stream's file descriptor at /dev/null (what C code
writes there too goes nowhere, quietly) and the process carries on.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, TextIO


class _Lasting:
    """A text stream whose failed writes send it, from then on, to /dev/null."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self._to_null()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._to_null()

    def _to_null(self) -> None:
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
        except (OSError, ValueError):
            return
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
        with contextlib.suppress(OSError):  # what could not be written: gone
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def outlast_readers() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` (once) so that a reader's end does not
    end this process's work."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Lasting):
            setattr(sys, name, _Lasting(stream))
