"""Linear layers with float8 (e4m3) weights and per-output-channel scales.

A quantized weight is ``wq`` [N, K] in ``torch.float8_e4m3fn`` and ``scale`` [N]
float32, standing for ``wq.float() * scale[:, None]``. Activations (per token)
are divided by ``amax(|row|) / 448`` (448 is e4m3's largest finite value).
A weight row's scale is chosen once, at load (``weight_scales``): of the
``SCALE_STEPS`` candidates ``amax / 448 * 2^(i / SCALE_STEPS)`` (none clips a
value), the one whose rounding has the least squared error. A float format's
relative precision does not depend on the scale, but where a row's values fall
between e4m3's grid points does; on SmolLM2-135M the search lowers the weights'
RMS rounding error from 2.63 % to 2.45 % and, on average over roundings, the KL
divergence of the logits from the unquantized model's by 18 % and top-1
disagreement from 7.0 % to 6.2 % (docs/quantization.md, "Accuracy").

Three ways to compute ``y = x Wᵀ + b``:

- the reference (every device; what CPU tests check): dequantize the weight to
  float32, cast it to the activation dtype and run ``F.linear``; activations
  are not quantized. Exact for float32 models: the oracle is transformers
  running the same dequantized weights.
- the FP8 tensor-core path (CUDA, compute capability >= 8.9, bfloat16
  activations): each token's activations are quantized on the fly with their
  own scale (``amax(|x_row|) / 448``) and ``torch._scaled_mm`` multiplies the
  two float8 operands with row-wise scales (``scale_a`` [M, 1], ``scale_b``
  [1, N], both float32; the second operand column-major, which ``wq.t()`` of a
  row-major [N, K] weight is, so the weight is stored as it is loaded).
- the skinny kernel (decode batches of at most ``SKINNY_MAX_ROWS`` rows, where
  Triton reads float8: ``ops.dispatch.skinny_fp8_linear_enabled``, on sm_89+
  unless ``MII_FP8_KERNELS=off``): ``ops.triton_gemv.skinny_linear_fp8`` streams
  the float8 weight (one byte per weight, the whole point at decode). At one
  row (batch 1, ``MII_GEMV_ONE_ROW=cores`` by default) it multiplies each
  converted weight by x's unquantized value on the CUDA cores; from two rows on,
  for 16-bit activations, it quantizes each slice of x to float8 and multiplies
  float8 by float8. The channel scale multiplies the float32 sum once.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mii.ops.dispatch import skinny_fp8_linear_enabled

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# The smallest activation amax a row's scale is computed from (the kernels too).
ACTIVATION_AMAX_FLOOR = 1e-30


def quantize_rows(
    w: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., K] -> (float8 [..., K], float32 scales [...]): one scale per row,
    ``amax / 448`` (random ``load_format="dummy"`` weights; activations have
    ``quantize_per_token``). ``amax`` [...] overrides the rows' own. Real weights:
    ``quantize_weight_rows``."""
    w32 = w.float()
    if amax is None:
        amax = w32.abs().amax(dim=-1)
    amax = amax.float()
    # An all-zero row keeps scale 1 (its float8 values are zeros either way).
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    wq = (w32 / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return wq, scale


SCALE_STEPS = 16  # candidate scales per weight row, spread over one octave


def weight_scales(w: torch.Tensor) -> torch.Tensor:
    """w: [..., K] -> float32 scales [...]: per row (output channel), the scale
    ``amax / 448 * 2^(i / SCALE_STEPS)``, i in [0, SCALE_STEPS), whose e4m3 rounding
    of the row has the least squared error (ties: the smallest). The largest value
    maps to (224, 448], so nothing is clipped; an all-zero row keeps scale 1.
    Worked in row chunks to bound the float32 temporaries."""
    flat = w.reshape(-1, w.shape[-1])
    # Rows per chunk: 4M values on the CPU; 32M on a GPU, where each chunk's 16
    # candidates are ~100 launches (a 70B model in 4M-value chunks: ~1.7M launches).
    values = (1 << 25) if w.is_cuda else (1 << 22)
    chunk = max(1, values // max(1, flat.shape[1]))
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start : start + chunk].float()
        amax = rows.abs().amax(dim=-1)
        base = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        best, best_err = base, torch.full_like(amax, float("inf"))
        for i in range(SCALE_STEPS):
            scale = base * 2.0 ** (i / SCALE_STEPS)
            rounded = (rows / scale[:, None]).to(FP8_DTYPE).float() * scale[:, None]
            err = (rounded - rows).square().sum(dim=-1)
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
        out[start : start + chunk] = best
    return out.reshape(w.shape[:-1])


def quantize_weight_rows(
    w: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., K] -> (float8 [..., K], float32 scales [...]) with ``weight_scales``;
    ``scale`` [...] overrides them (a row-parallel rank quantizes its slice of a row
    with the scale of the whole row)."""
    scale = weight_scales(w) if scale is None else scale.float()
    wq = (w.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return wq, scale


def dequantize_rows(wq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight a quantized one stands for, in ``dtype`` (computed in float32)."""
    return (wq.float() * scale.float().unsqueeze(-1)).to(dtype)


def fp8_linear_reference(
    x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [M, K] -> [M, N]: dequantize, then a matmul in the activation dtype."""
    return F.linear(x, dequantize_rows(wq, scale, x.dtype), bias)


def scaled_mm_enabled(x: torch.Tensor, wq: torch.Tensor) -> bool:
    """Whether ``fp8_linear`` runs ``torch._scaled_mm``: CUDA with FP8 tensor cores
    (Ada, Hopper and newer), bfloat16 activations (row-wise scaling produces
    bfloat16 only), and both matrix sizes multiples of 16 (cuBLASLt's rule)."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and x.dim() == 2
        and wq.dim() == 2
        and wq.shape[0] % 16 == 0
        and wq.shape[1] % 16 == 0
        and wq.stride(-1) == 1
        and _fp8_tensor_cores(x.device.index if x.device.index is not None else -1)
    )


@functools.cache
def _fp8_tensor_cores(index: int) -> bool:
    if torch.version.hip is not None:
        return False
    index = torch.cuda.current_device() if index < 0 else index
    return torch.cuda.get_device_capability(index) >= (8, 9)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (float8 [M, K], float32 scales [M, 1]): each token its own scale,
    ``amax / 448``; the values are multiplied by ``448 / amax``, both quotients
    correctly rounded, as ``ops.triton_quant`` computes them (the float8-product
    loops of ``ops.triton_gemv`` / ``ops.triton_moe`` use the GPU's approximate
    division for the same quotients)."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    # An all-zero row: scale 1; a tiny one (below 1e-30) as if it were 1e-30, so
    # that 448 / amax stays finite (an infinite one would make 0 * inf = NaN).
    amax = torch.where(amax > 0, amax.clamp_min(ACTIVATION_AMAX_FLOOR), FP8_MAX)
    # Correctly rounded float32 quotients (through float64), as IEEE division gives
    # them: torch's own float32 division by a tensor can be an ulp off, enough to move
    # a value that lands on a float8 midpoint to the other neighbour.
    scale = (amax.double() / FP8_MAX).float()
    inverse = (FP8_MAX / amax.double()).float()
    return (x32 * inverse).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear_scaled_mm(
    x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [M, K] bfloat16 -> [M, N] bfloat16 on the FP8 tensor cores."""
    # One Triton launch instead of six torch passes (ops/triton_quant.py); under
    # torch.compile the torch version, which Inductor fuses, stays.
    if x.stride(-1) == 1 and not torch.compiler.is_compiling():
        from mii.ops.triton_quant import quantize_per_token_fp8  # Triton: CUDA-only here

        xq, x_scale = quantize_per_token_fp8(x)
    else:
        xq, x_scale = quantize_per_token(x)
    out = torch._scaled_mm(
        xq.contiguous(),  # row-major first operand
        wq.t(),  # [K, N], column-major: the layout cuBLASLt wants for the second operand
        scale_a=x_scale,  # [M, 1]
        scale_b=scale.view(1, -1),  # [1, N]
        out_dtype=x.dtype,
    )
    return out if bias is None else out + bias


def fp8_linear(
    x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x Wᵀ + b`` for a float8 weight: the skinny kernel for decode batches,
    the FP8 tensor cores for larger ones where they run, else the reference (see
    the module docstring)."""
    if skinny_fp8_linear_enabled(x, wq, scale, bias):
        from mii.ops.triton_gemv import skinny_linear_fp8  # Triton: a CUDA-only dependency

        return skinny_linear_fp8(x, wq, scale, bias)
    if scaled_mm_enabled(x, wq):
        return fp8_linear_scaled_mm(x, wq, scale, bias)
    return fp8_linear_reference(x, wq, scale, bias)
