"""Linear layers of decode batches (a few to a few hundred rows), in Triton.

At batch 1 a decode step is ``y = x Wᵀ`` for every weight of the model, and its
time is the time to read the weights once. This kernel gives each program a
band of ``BLOCK_N`` output rows of ``W`` and ``BLOCK_M`` rows of ``x`` and
streams them along ``K`` in ``BLOCK_K`` slices through a software pipeline
(``num_stages`` slices in flight) onto the tensor cores (``x`` padded to 16 rows,
free where the weights' bytes set the pace), or at one row (batch 1, the default
``MII_GEMV_ONE_ROW=cores``) onto the CUDA cores in float32, no padding
(``ops/triton_gemv_cores.py``). Past ``BLOCK_M`` rows, the programs of one weight
band are launched next to each other, so the band is read from memory once and
from the L2 cache by the others.

The launch (tiles, stages, split-K, float8 activation handling) is chosen by
``ops/triton_gemv_launch.py`` from the rows and the weight's shape.

Used by ``models.layers.linear`` on CUDA for at most ``MAX_ROWS`` rows outside
torch.compile (``MII_GEMV=torch`` turns it off); larger batches stay with cuBLAS
until ``benchmarks/gemv_sweep.py --rows 64 128 256`` shows the kernel ahead.
Tested on CPU under ``TRITON_INTERPRET=1`` against ``torch.nn.functional.linear``.

``skinny_linear_fp8`` is the same kernel on float8 e4m3 weights with one float32
scale per output channel (``ops.fp8_linear``), so a decode step reads one byte
per weight: at one row by default on the CUDA cores, each weight converted to
float32 where it is loaded and multiplied by x's unquantized value
(``GemvConfig.cores``); otherwise in one of two ways (``GemvConfig.fp8_dot``):

- float8 products (the default): each ``BLOCK_K`` slice of each row of x is
  quantized to e4m3 in registers with its own scale (``amax / 448``: finer than
  the per-token scale of the prompt path's ``torch._scaled_mm``), the tensor
  cores multiply float8 by float8, and each slice's float32 product is scaled
  back before it joins the sum (so their float8 accumulation never spans more
  than one slice); 16-bit activations only;
- 16/32-bit products (float32 activations always): each slice of the weight
  is converted to the activations' dtype in registers (exact: every e4m3 value
  is a bfloat16 and a float16 value); the activations are not quantized. The
  conversion, not the memory, set this one's pace on an H200.

Either way the channel's scale multiplies the sum once at the end (after
split-K's partials are added).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.ops import fp8_activations, triton_arrivals, triton_limits, triton_pdl
from mii.ops.dispatch import FUSED_ACTIVATIONS, INTERPRETED, SKINNY_MAX_ROWS
from mii.ops.fused_elementwise import gated_activation
from mii.ops.triton_fp8 import dequantize_e4m3, quantize_rows_e4m3
from mii.ops.triton_gemv_cores import cores_partial_sums
from mii.ops.triton_gemv_launch import (
    GemvConfig,
    bf16_config_for,
    fp8_config_for,
    fp8_products,
    split_k_for,
)

MAX_ROWS = SKINNY_MAX_ROWS


@triton.jit(do_not_specialize=["M"])
def _skinny_linear_kernel(
    X,
    W,
    Scale,
    Bias,
    Out,
    Partials,
    Arrivals,
    XScale,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_om,
    stride_xs,
    HAS_BIAS: tl.constexpr,
    W_SCALED: tl.constexpr,
    DEQUANT: tl.constexpr,
    X_FP8: tl.constexpr,
    X_GROUPS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    LINE: tl.constexpr,
    GATED: tl.constexpr,
    ROUND: tl.constexpr,
    CORES: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    """Out[m, n] = sum_k X[m, k] W[n, k] (+ Bias[n]) for this program's BLOCK_N
    rows of W and BLOCK_M rows of X (row tiles vary fastest: one weight band's
    programs run together), over its ``k_per_split`` slice of K. With W_SCALED,
    W is float8 and Out[m, n] is that sum times Scale[n] (+ Bias[n]).

    With SPLIT_K > 1 the programs of one output tile each write a float32 partial;
    the last to arrive (an atomic count per tile) adds them up, writes the output
    and resets the count for the next launch: one launch, no memset, graph-safe.

    GATED (1 + the activation's code in ``FUSED_ACTIVATIONS``): W is a gate/up
    pair [2 I, K] (N = 2 I) and Out [M, I] = act(gate) * up. A program's BLOCK_N
    rows are BLOCK_N / 2 gate rows and the up rows I further on, so its epilogue
    holds both halves of its output columns (``_finish``)."""
    row_tiles = tl.cdiv(M, BLOCK_M)
    tile = tl.program_id(0)
    band = tile // row_tiles
    if GATED:
        half: tl.constexpr = BLOCK_N // 2
        rows_n = tl.arange(0, BLOCK_N)
        out_n = band * half + rows_n % half  # the output column each row adds to
        offs_n = out_n + (rows_n // half) * (N // 2)
        n_mask = out_n < N // 2
    else:
        offs_n = band * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
    offs_m = (tile - band * row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    # The bounds must stay provably multiples of 16 (K and k_per_split are
    # specialised as such): with a bound of unknown alignment, e.g. min(K, end),
    # Triton cannot vectorise the masked loads, and the kernel ran 1.5x slower.
    if SPLIT_K > 1:
        k_begin = tl.program_id(1) * k_per_split
        k_stop = k_begin + k_per_split  # the last split may run past K: masked
    else:
        k_begin = 0
        k_stop = K
    if PDL and PREFETCH_LINES > 0:
        # Launched while the previous kernel still runs: the weights need nothing
        # from it, so the first PREFETCH_LINES lines (LINE columns each) of this
        # program's rows head for the L2 cache now; x only after the wait.
        cols = k_begin + tl.arange(0, PREFETCH_LINES) * LINE
        wanted = n_mask[:, None] & (cols < K)[None, :]
        lines = W + offs_n[:, None] * stride_wn + cols[None, :]
        triton_pdl.prefetch_to_l2(tl.where(wanted, lines, W))
    triton_pdl.wait_for_predecessor(PDL)
    # X_GROUPS: each slice's x scales are loaded one trip ahead. Loaded in their own
    # trip (a load Triton leaves out of the software pipeline: it feeds no dot) they
    # cost every trip one wait for the L2 cache.
    scales_ahead = tl.full([BLOCK_M], 1.0, tl.float32)
    if X_GROUPS:
        scales_ahead = tl.load(
            XScale + offs_m * stride_xs + k_begin // BLOCK_K, mask=m_mask, other=1.0
        )
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    if CORES:
        acc = cores_partial_sums(
            X, W, offs_m, offs_n, offs_k, m_mask, n_mask, k_begin, k_stop, K,
            stride_xm, stride_wn, W_SCALED, DEQUANT, BLOCK_N, BLOCK_M, BLOCK_K, LOOP_STAGES,
        )  # fmt: skip
    else:
        for k0 in range(k_begin, k_stop, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            w = tl.load(
                W + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            x = tl.load(
                X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if X_GROUPS:
                # x arrives as float8 already, with one scale per row and BLOCK_K slice
                # (ops/triton_quant.quantize_groups_fp8): the loop only loads and multiplies.
                x_scale = scales_ahead
                ahead = m_mask & (k0 + BLOCK_K < K)
                scales_ahead = tl.load(
                    XScale + offs_m * stride_xs + (k0 + BLOCK_K) // BLOCK_K, mask=ahead, other=1.0
                )
                if UPCAST:  # the interpreter: float32 dot of the exact float8 values
                    part = tl.dot(
                        w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee"
                    )
                else:
                    part = tl.dot(w, tl.trans(x))
                acc += part * x_scale[None, :]
            elif X_FP8:
                # Float8 weights times float8 activations on the tensor cores: no weight
                # conversion (which held the bf16-product kernel to ~40 % of HBM on an
                # H200). Each row of this x slice gets its own scale (a finer grain than
                # per token); the float32 product of the slice is scaled back before it
                # joins the sum, so the tensor cores' float8 accumulation spans one slice.
                xq, x_scale = quantize_rows_e4m3(x, UPCAST)
                if UPCAST:  # the interpreter: float32 values on the e4m3 grid, float32 dot
                    part = tl.dot(w.to(tl.float32), tl.trans(xq), input_precision="ieee")
                else:
                    part = tl.dot(w, tl.trans(xq))
                acc += part * x_scale[None, :]
            else:
                if W_SCALED:  # float8 -> x's dtype: exact (e4m3 is a subset of bf16 and fp16)
                    w = dequantize_e4m3(w, X.dtype.element_ty, DEQUANT)
                if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong: compute in fp32 there
                    w = w.to(tl.float32)
                    x = x.to(tl.float32)
                if IEEE:  # Triton needs a constexpr branch here
                    acc += tl.dot(w, tl.trans(x), input_precision="ieee")
                else:
                    acc += tl.dot(w, tl.trans(x))
    if SPLIT_K > 1:
        out_mask = n_mask[:, None] & m_mask[None, :]
        # Partials [SPLIT_K, M, N] float32; visible to the last program before it counts.
        here = offs_m[None, :] * N + offs_n[:, None]
        tl.store(Partials + tl.program_id(1) * M * N + here, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(Arrivals + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for split in range(0, SPLIT_K):
                acc += tl.load(
                    Partials + split * M * N + here, mask=out_mask, other=0.0, cache_modifier=".cg"
                )
            _finish(
                acc, Scale, Bias, Out, offs_m, offs_n, n_mask, stride_om, m_mask, band,
                HAS_BIAS, W_SCALED, GATED, ROUND, BLOCK_N, BLOCK_M, N,
            )  # fmt: skip
            tl.atomic_xchg(Arrivals + tile, 0)  # ready for the next launch (graph replays)
    else:
        _finish(
            acc, Scale, Bias, Out, offs_m, offs_n, n_mask, stride_om, m_mask, band,
            HAS_BIAS, W_SCALED, GATED, ROUND, BLOCK_N, BLOCK_M, N,
        )  # fmt: skip


@triton.jit
def _finish(
    acc,
    Scale,
    Bias,
    Out,
    offs_m,
    offs_n,
    n_mask,
    stride_om,
    m_mask,
    band,
    HAS_BIAS: tl.constexpr,
    W_SCALED: tl.constexpr,
    GATED: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    N,
):
    """Out[offs_m, offs_n] = acc (* Scale) (+ Bias), acc laid out [BLOCK_N, BLOCK_M];
    GATED: act(gate) * up of its two halves, into BLOCK_N / 2 columns of Out."""
    if W_SCALED:  # float8 weights: each output channel's scale, once, on the whole sum
        acc *= tl.load(Scale + offs_n, mask=n_mask, other=1.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    values = acc.to(Out.dtype.element_ty)  # what the gate/up projection would store
    if GATED:
        # The act-and-mul kernel's own arithmetic on those stored values: the same
        # numbers as the two launches.
        half: tl.constexpr = BLOCK_N // 2
        pair = tl.permute(tl.reshape(values.to(tl.float32), [2, half, BLOCK_M]), (1, 2, 0))
        gate, up = tl.split(pair)
        cols = band * half + tl.arange(0, half)
        mask = (cols < N // 2)[:, None] & m_mask[None, :]
        out = gated_activation(gate, up, Out.dtype.element_ty, GATED - 1, ROUND)
        tl.store(Out + offs_m[None, :] * stride_om + cols[:, None], out, mask=mask)
    else:
        out_mask = n_mask[:, None] & m_mask[None, :]
        tl.store(Out + offs_m[None, :] * stride_om + offs_n[:, None], values, mask=out_mask)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x of shape [M, K] (tuned for M <= ``MAX_ROWS``)."""
    _check(x, weight, bias, "skinny_linear")
    config = config or bf16_config_for(x.shape[0], weight.shape[0], x.device)
    return _launch(x, weight, None, bias, config)


def skinny_linear_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` for x [M, K] (16/32-bit), a float8
    e4m3 ``weight`` [N, K] and float32 per-output-channel ``scale`` [N] (tuned for
    M <= ``MAX_ROWS``); the output has x's dtype."""
    _check(x, weight, bias, "skinny_linear_fp8")
    _check_fp8(weight, scale, "skinny_linear_fp8")
    n = weight.shape[0]
    config = config or fp8_config_for(x.shape[0], n, x.shape[1], x.device)
    return _launch(x, weight, scale, bias, config)


def skinny_gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    activation: str,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``act(gate) * up`` of ``F.linear(x, weight, bias)`` = [gate | up] in one launch:
    x [M, K], ``weight`` [2 I, K] (the gate's rows, then the up projection's) -> [M, I],
    the same numbers as ``skinny_linear`` (or ``skinny_linear_fp8`` with float8 weights
    and their channel ``scale``) then ``fused_elementwise.act_and_mul``."""
    name = "skinny_gated_linear"
    _check(x, weight, bias, name)
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"{name}: no fused form of activation {activation!r}")
    n = weight.shape[0]
    if n % 2:
        raise ValueError(f"{name} needs a weight of 2 I rows (gate, then up), not {n}")
    if scale is None:
        config = config or bf16_config_for(x.shape[0], n, x.device)
    else:
        _check_fp8(weight, scale, name)
        config = config or fp8_config_for(x.shape[0], n, x.shape[1], x.device)
    return _launch(x, weight, scale, bias, config, gated=1 + FUSED_ACTIVATIONS[activation])


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> None:
    """ValueError naming ``name`` unless x [M, K] and weight [N, K] (rows contiguous),
    bias [N] and the weight's size suit the kernel."""
    n, k = weight.shape[0], x.shape[1]
    if weight.shape[1] != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"{name} needs x [M, K] and weight [N, K], rows contiguous")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"{name} needs a contiguous bias of {n} values")
    if weight.numel() >= 2**31:  # the kernel's offsets are int32
        raise ValueError(f"{name} takes weights of fewer than 2**31 elements")


def _check_fp8(weight: torch.Tensor, scale: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` unless ``weight`` is float8 e4m3 with one contiguous
    float32 ``scale`` per row."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name} needs a float8_e4m3fn weight, not {weight.dtype}")
    n = weight.shape[0]
    if scale.shape != (n,) or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"{name} needs a contiguous float32 scale of {n} values")


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    config: GemvConfig,
    gated: int = 0,
) -> torch.Tensor:
    """One launch of the kernel (``scale``: float8 weights' channel scales; ``gated``:
    the kernel's GATED, the output then act(gate) * up of half the columns)."""
    rows, k = x.shape
    n = weight.shape[0]
    if config.cores and config.block_m not in (1, 2, 4):
        raise ValueError(
            f"a CUDA-core launch takes 1, 2 or 4 rows per program, not {config.block_m}"
        )
    out = torch.empty(rows, n // 2 if gated else n, device=x.device, dtype=x.dtype)
    if rows == 0:
        return out
    stage_bytes = (
        config.block_n * weight.element_size() + config.block_m * x.element_size()
    ) * config.block_k
    # (gated: each band is block_n / 2 gate rows and as many up rows)
    bands = triton.cdiv(n // 2, config.block_n // 2) if gated else triton.cdiv(n, config.block_n)
    tiles = bands * triton.cdiv(rows, config.block_m)
    line = 128 // weight.element_size()  # elements per 128-byte cache line
    prefetch_lines = triton.next_power_of_2(config.prefetch_k // line) if config.prefetch_k else 0
    x_fp8 = scale is not None and fp8_products(config, x.dtype)
    x_groups = x_fp8 and config.x_groups
    x_scales = out  # unused without x_groups
    if x_groups:
        # The copy the kernel that wrote x made (ops/fp8_activations.py), else a launch.
        copy = fp8_activations.take(x, config.block_k)
        if copy is None:
            from mii.ops.triton_quant import quantize_groups_fp8

            copy = quantize_groups_fp8(x, config.block_k)
        x, x_scales = copy
    # (as many stages as the device's shared memory holds: float32 weights on an L4 fit
    # fewer than the launch asks for)
    stages = triton_limits.stages_that_fit(config.num_stages, stage_bytes, x.device)
    splits = split_k_for(config, tiles, k, x.device)
    if splits > 1 and triton_arrivals.arrival_counts(x.device, tiles) is None:
        splits = 1  # (no counts during graph capture before an eager pass: unsplit)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), config.block_k) * config.block_k
    splits = triton.cdiv(k, k_per_split)  # rounding up to whole slices may need fewer
    if splits > 1:
        partials = torch.empty(splits, rows, n, device=x.device, dtype=torch.float32)
        arrivals = triton_arrivals.arrival_counts(x.device, tiles)
    else:
        partials = arrivals = out  # unused
    _skinny_linear_kernel[(tiles, splits)](
        x,
        weight,
        scale if scale is not None else out,  # unused without
        bias if bias is not None else out,  # unused without
        out,
        partials,
        arrivals,
        x_scales,
        rows,
        n,
        k,
        k_per_split,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        x_scales.stride(0),
        HAS_BIAS=bias is not None,
        W_SCALED=scale is not None,
        DEQUANT=config.dequant,
        X_FP8=x_fp8,
        X_GROUPS=x_groups,
        IEEE=x.dtype == torch.float32,
        # The interpreter's 16-bit dots and float8 casts are wrong: float32 there.
        UPCAST=INTERPRETED and (x.dtype != torch.float32 or x_fp8),
        SPLIT_K=splits,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        PREFETCH_LINES=prefetch_lines,
        LINE=line,
        GATED=gated,
        # the act-and-mul kernel's rounding (the interpreter truncates bf16 casts)
        ROUND=INTERPRETED and out.dtype == torch.bfloat16,
        CORES=config.cores,
        LOOP_STAGES=stages,  # the one-row loop's own pipeline: the same fitted depth
        **triton_pdl.launch_options(x.device),
        num_warps=config.num_warps,
        num_stages=stages,
    )
    return out
