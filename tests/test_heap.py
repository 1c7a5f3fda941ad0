"""The startup-heap freeze is counted per engine and respects the application's own."""

from __future__ import annotations

import gc

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
