"""Host-to-device uploads: values, dtypes and shapes survive; on a GPU the host
does not wait for the work already queued on the stream."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mii.ops.transfer import ALIGN_BYTES, upload

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_upload_keeps_values_dtypes_and_shapes():
    table = np.arange(12, dtype=np.int64).reshape(3, 4)
    items = [
        ([5, -1, 2**40], torch.int64),
        (table, torch.int32),
        ([0.5, 2.25], torch.float32),
        ([], torch.int64),
        ([True, False, True], torch.bool),
        (np.array([7, 8]), torch.int32),
    ]
    out = upload(DEVICE, items)
    assert [t.dtype for t in out] == [d for _, d in items]
    assert [tuple(t.shape) for t in out] == [(3,), (3, 4), (2,), (0,), (3,), (2,)]
    assert all(t.device.type == DEVICE.type for t in out)
    assert out[0].tolist() == [5, -1, 2**40]
    assert out[1].tolist() == table.tolist()
    assert out[2].tolist() == [0.5, 2.25]
    assert out[4].tolist() == [True, False, True]
    assert out[5].tolist() == [7, 8]


def test_every_tensor_is_aligned():
    """Triton compiles a kernel variant per pointer alignment: keep it constant."""
    items = [([1] * n, torch.int32) for n in (1, 3, 17, 0, 5)] + [([2] * 3, torch.int64)]
    for tensor in upload(DEVICE, items):
        assert tensor.data_ptr() % ALIGN_BYTES == 0


def test_upload_copies_the_host_values():
    values = np.array([1, 2, 3])
    (tensor,) = upload(DEVICE, [(values, torch.int64)])
    values[:] = 0  # the host array is the caller's to reuse
    assert tensor.tolist() == [1, 2, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_upload_does_not_wait_for_queued_work():
    """A copy from pageable memory would block until the queued kernel ends."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # about a second of queued device work
    start = time.perf_counter()
    (tensor,) = upload(DEVICE, [(list(range(1000)), torch.int64)])
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    assert elapsed < 0.1, f"upload waited {elapsed:.3f} s for the stream"
    assert tensor.sum().item() == sum(range(1000))
