"""Keep full garbage collections off the startup heap while engines serve.

A full collection walks every tracked object; with a model, tokenizer and CUDA
graphs loaded, one took 220 ms in the middle of W1, the GPU idle all along.
``gc.freeze()`` moves the objects alive now out of the collector's sight (vLLM
does the same after start-up). The freeze is process-wide, so it is counted: the
heap is unfrozen when the last engine that froze it is released, and never when
the application had frozen objects itself before the first engine did.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_engines = 0  # engines holding the freeze
_frozen_by_application = False


def freeze_startup_heap() -> None:
    """Collect, then freeze every object alive now (one engine's hold)."""
    global _engines, _frozen_by_application
    with _lock:
        if _engines == 0:
            _frozen_by_application = gc.get_freeze_count() > 0
        gc.collect()
        gc.freeze()
        _engines += 1


def thaw_startup_heap() -> None:
    """Drop one engine's hold; the last one makes the frozen objects collectable
    again (unless the application froze objects of its own first)."""
    global _engines
    with _lock:
        if _engines == 0:
            return
        _engines -= 1
        if _engines == 0 and not _frozen_by_application:
            gc.unfreeze()


def return_freed_memory() -> None:
    """Collect, then hand the C heap's free pages back to the system (glibc's
    ``malloc_trim``): an engine's released weights otherwise stay in the process's
    resident memory (a notebook's ``%mii unload`` of SmolLM2 on the CPU kept ~2 GB
    until the next load reused it). Elsewhere (no glibc) only the collection."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the process already has
    except (OSError, AttributeError):  # not glibc (musl, macOS), or no symbol table
        return None
