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


@triton.jit
def round_to_e4m3(v):
    """float32 ``v`` (|v| <= 448) rounded to the nearest float8 e4m3 value, ties to
    even, as float32: what ``v.to(tl.float8e4nv)`` computes on the GPU. For the CPU
    interpreter, whose float8 cast loses the carry when rounding reaches the next
    power of two (126.7 became 64, Triton 3.x). Normal values keep 3 of float32's
    23 mantissa bits (the rounding bias carries into the exponent as it should);
    below e4m3's smallest normal, 2**-6, the grid is fixed at 2**-9."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    normal = rounded.to(tl.float32, bitcast=True)
    # Subnormals: |v| * 512 is exact and small, so adding and subtracting 1.5 * 2**23
    # rounds it to an integer, ties to even (float32 round-to-nearest); then the sign
    # (a negative value rounding to zero comes out +0: Triton's minus is 0 - x).
    magnitude = ((tl.abs(v) * 512.0 + 12582912.0) - 12582912.0) / 512.0
    subnormal = tl.where(v < 0, -magnitude, magnitude)
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def quantize_rows_e4m3(x, EMULATE: tl.constexpr):
    """A tile x [R, C] (16/32-bit) as float8 e4m3 values, each row with its own
    scale: (values [R, C], scales [R] float32), ``x ~ values * scales[:, None]``,
    scale ``amax / 448`` (1 for an all-zero row). The float8-product loops of the
    skinny and grouped kernels quantize each slice of their activations with it.

    Two divisions per row and a product per value, as torch's
    ``fp8_linear.quantize_per_token`` (equal under the interpreter, whose
    division is IEEE; on the GPU Triton's division is approximate, so a value
    may round to the neighbouring float8 one): IEEE divisions (``div_rn``) in
    these loops cost 40-55 % more time per weight on an H200.
    With EMULATE (the CPU interpreter, whose float8 cast mis-rounds) the values
    come back as float32 on the e4m3 grid."""
    x32 = x.to(tl.float32)
    amax = tl.max(tl.abs(x32), axis=1)
    # An all-zero row: scale 1 (no 0 / 0); a tiny one: 448 / amax stays finite.
    amax = tl.where(amax > 0, tl.maximum(amax, 1e-30), 448.0)
    scale = amax / 448.0
    x32 = x32 * (448.0 / amax)[:, None]
    if EMULATE:
        return round_to_e4m3(x32), scale
    else:
        return x32.to(tl.float8e4nv), scale
