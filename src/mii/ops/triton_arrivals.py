"""Arrival counts for kernels whose programs split one result and whose last
program to finish combines the parts (split-K in ``ops/triton_gemv.py``, split-KV
in ``ops/triton_attention.py``): one launch, no memset, graph-safe.

Each program that wrote a part adds one to its result's count (an atomic with
acquire-release order, after the part's stores); the program that sees the last
arrival reads the parts and writes the result, then sets the count back to zero
for the next launch. So every launch leaves the counts as it found them: all
zero. The kernels that use them never run at the same time on one device (each
is stream-ordered after the last, and a kernel launched early with PDL touches
its counts only after its predecessor has completed), so one buffer per device
serves them all. That assumes one stream of such kernels per device at a time, as
an engine runs them: two engines decoding on one GPU from two streams at once
could each see the other's arrivals (a count that ends wrong stays wrong).
"""

from __future__ import annotations

import torch

# Sized for any result count a decode batch makes (a 256k vocabulary is 4k tiles
# of the skinny linear kernel).
SLOTS = 1 << 16
_counts: dict[torch.device, torch.Tensor] = {}


def arrival_counts(device: torch.device, results: int) -> torch.Tensor | None:
    """The per-device zeroed int32 counts for a launch of ``results`` split results;
    None where they cannot be had (more results than ``SLOTS``, or during CUDA graph
    capture before any eager call allocated them: an allocation there would belong to
    the graph's memory pool). Callers then combine the parts another way."""
    if results > SLOTS:
        return None
    if device not in _counts:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counts[device] = torch.zeros(SLOTS, dtype=torch.int32, device=device)
    return _counts[device]
