"""The startup-heap freeze is counted per engine and respects the application's own."""

from __future__ import annotations

import gc
import os
import sys

import pytest

from mii.engine import heap


@pytest.fixture(autouse=True)
def clean_freeze():
    gc.unfreeze()
    yield
    while heap._engines:
        heap.thaw_startup_heap()
    gc.unfreeze()


def test_last_engine_unfreezes():
    heap.freeze_startup_heap()
    heap.freeze_startup_heap()
    assert gc.get_freeze_count() > 0
    heap.thaw_startup_heap()
    assert gc.get_freeze_count() > 0  # the other engine still serves
    heap.thaw_startup_heap()
    assert gc.get_freeze_count() == 0
    heap.thaw_startup_heap()  # a second release of the same engine changes nothing
    assert gc.get_freeze_count() == 0


def test_application_freeze_is_left_alone():
    gc.freeze()
    heap.freeze_startup_heap()
    heap.thaw_startup_heap()
    assert gc.get_freeze_count() > 0


def _resident_mib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_freed_heap_goes_back_to_the_system():
    """return_freed_memory hands free heap pages back (glibc keeps them otherwise):
    ~800 MiB of tensors small enough for the heap, freed, left the resident size up
    until it was called."""
    import torch

    before = _resident_mib()
    pieces = [torch.ones(20_000) for _ in range(10_000)]  # 80 KB each: heap, not mmap
    assert _resident_mib() - before > 600
    del pieces
    heap.return_freed_memory()
    assert _resident_mib() - before < 300  # it stayed ~800 MiB up without the trim


def test_an_engine_returns_its_memory_when_released(llama, monkeypatch):
    import mii

    calls = []
    monkeypatch.setattr(heap, "return_freed_memory", lambda: calls.append(1))
    pipe = mii.pipeline(llama)
    pipe("DeepSpeed is", max_new_tokens=2)
    assert calls == []
    pipe.destroy()
    assert calls == [1]
