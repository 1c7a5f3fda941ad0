"""What a Triton launch may ask of the GPU it runs on: shared memory for its
software pipeline (tiles tuned on an H100 must still launch on an A100, 164 KB
per program, or an L4 / RTX 4090, 99 KB, with fewer stages in flight), and how
many programs fill it."""

from __future__ import annotations

import functools

import torch

from mii.ops.dispatch import INTERPRETED

# The most the pipeline stages of one program may take: the budget the H100 sweeps
# ran under (room for the epilogue's layout conversions next to the stages).
PLANNED_BYTES = 160 * 1024
# Left free on a smaller GPU, for the same epilogue.
_EPILOGUE_BYTES = 8 * 1024


def stages_that_fit(
    stages: int, bytes_per_stage: int, device: torch.device, reserved: int = 0
) -> int:
    """``stages``, fewer where that many would not fit the shared memory one
    program may use on ``device`` (the interpreter plans as for an H100), after
    ``reserved`` bytes that the program holds outside its pipeline (a query tile)."""
    budget = PLANNED_BYTES
    if device.type == "cuda" and not INTERPRETED:
        index = device.index if device.index is not None else torch.cuda.current_device()
        budget = min(budget, _shared_memory_per_program(index) - _EPILOGUE_BYTES)
    return max(1, min(stages, (budget - reserved) // bytes_per_stage))


@functools.cache
def _shared_memory_per_program(index: int) -> int:
    import triton  # only reached on CUDA, where Triton is installed

    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


# Multiprocessors assumed where there is no GPU to ask (the interpreter): an H100's.
_INTERPRETER_SMS = 132


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (an H100's count off CUDA)."""
    if device.type != "cuda" or INTERPRETED:
        return _INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
