"""Host-to-device copies that never make the host wait for the device.

A copy from pageable host memory (``torch.tensor(values).to("cuda")``, even with
``non_blocking=True``) makes the CPU wait until every kernel already queued on
the stream has finished: with async scheduling that would stall the host on the
pass in flight, every pass. Here the values are staged in pinned memory from
PyTorch's caching host allocator, which keeps each staging block alive until
its copy has run, and copied with one transfer per dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_NUMPY_DTYPES = {
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.float32: np.float32,
    torch.bool: np.bool_,
}


# Every tensor starts on a 64-byte boundary of the staging buffer. Triton
# specialises a kernel on whether each pointer is 16-byte aligned: views at
# arbitrary offsets would compile new variants of a kernel pass after pass.
ALIGN_BYTES = 64


def upload(
    device: torch.device, items: Sequence[tuple[np.ndarray | Sequence, torch.dtype]]
) -> list[torch.Tensor]:
    """``items`` (array-like, dtype) as device tensors of the same shapes, in order,
    each aligned to ``ALIGN_BYTES``.

    One staging buffer and one copy per dtype; on CUDA the buffer is pinned and
    the copy asynchronous.
    """
    arrays = [np.asarray(values, dtype=_NUMPY_DTYPES[dtype]) for values, dtype in items]
    out: list[torch.Tensor | None] = [None] * len(arrays)
    for dtype in dict.fromkeys(dtype for _, dtype in items):
        members = [i for i, (_, d) in enumerate(items) if d == dtype]
        step = ALIGN_BYTES // np.dtype(_NUMPY_DTYPES[dtype]).itemsize
        offsets, total = [], 0
        for i in members:
            offsets.append(total)
            total += -(-arrays[i].size // step) * step
        host = torch.empty(total, dtype=dtype, pin_memory=device.type == "cuda")
        flat = host.numpy()
        for i, offset in zip(members, offsets):
            flat[offset : offset + arrays[i].size] = arrays[i].ravel()
        on_device = host.to(device, non_blocking=True)
        for i, offset in zip(members, offsets):
            out[i] = on_device[offset : offset + arrays[i].size].view(arrays[i].shape)
    return out  # type: ignore[return-value]
