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


def upload(
    device: torch.device, items: Sequence[tuple[np.ndarray | Sequence, torch.dtype]]
) -> list[torch.Tensor]:
    """``items`` (array-like, dtype) as device tensors of the same shapes, in order.

    On CUDA, one pinned staging buffer and one asynchronous copy per dtype; on
    other devices, plain copies.
    """
    arrays = [np.asarray(values, dtype=_NUMPY_DTYPES[dtype]) for values, dtype in items]
    if device.type != "cuda":
        return [torch.from_numpy(a.copy()).to(device) for a in arrays]
    out: list[torch.Tensor | None] = [None] * len(arrays)
    for dtype in dict.fromkeys(dtype for _, dtype in items):
        members = [i for i, (_, d) in enumerate(items) if d == dtype]
        sizes = [arrays[i].size for i in members]
        host = torch.empty(sum(sizes), dtype=dtype, pin_memory=True)
        flat = host.numpy()
        offset = 0
        for i, size in zip(members, sizes):
            flat[offset : offset + size] = arrays[i].ravel()
            offset += size
        on_device = host.to(device, non_blocking=True)
        offset = 0
        for i, size in zip(members, sizes):
            out[i] = on_device[offset : offset + size].view(arrays[i].shape)
            offset += size
    return out  # type: ignore[return-value]
