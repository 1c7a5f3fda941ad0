"""Float8 e4m3 weights read by Triton kernels: two ways to turn them into numbers.

``DEQUANT`` 0 (the default): Triton's own conversion, ``w.to(dtype)``. On sm_89+
that is the ``cvt`` conversion instructions (e4m3x2 -> f16x2, then f16 -> bf16 for
bfloat16), which run on a narrow pipe: at batch 1 a kernel converts about 20
weights per clock per multiprocessor to keep up with HBM3e, so the conversion may
be what sets the pace rather than the memory.

``DEQUANT`` 1: integer operations only. An e4m3 byte ``s eeee mmm`` placed as
``s`` in a float32's sign bit and ``eeee mmm`` at the top of its exponent's low
bits and mantissa (``(b & 0x7F) << 20``) is the same number times 2**-120, for
normal and subnormal e4m3 values alike (float32 subnormals then); one float32
multiply by 2**120 makes it exact, and the cast to bfloat16/float16 is exact
(every e4m3 value is one). Which is faster is for ``benchmarks/gemv_sweep.py
--fp8 --fp8-sweep`` / ``benchmarks/moe_fp8.py`` to say on the GPU; both are
exact for every finite e4m3 value (tested under the interpreter; e4m3's NaN
encodings never occur in quantized weights).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dequantize_e4m3(w, dtype: tl.constexpr, DEQUANT: tl.constexpr):
    """float8 e4m3 ``w`` as ``dtype`` (exact), the way ``DEQUANT`` says (module docstring)."""
    if DEQUANT == 1:
        b = w.to(tl.uint8, bitcast=True).to(tl.uint32)
        bits = ((b & 0x80) << 24) | ((b & 0x7F) << 20)
        return (bits.to(tl.float32, bitcast=True) * 1.329227995784916e36).to(dtype)  # 2**120
    else:
        return w.to(dtype)
