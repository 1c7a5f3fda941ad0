"""Which launch of the skinny linear kernel (``ops/triton_gemv.py``) a decode
batch gets: tile shapes, pipeline depth, split-K and, for float8 weights, how the
activations are quantized, chosen by the number of rows and the weight's shape
from sweeps of ``benchmarks/gemv_sweep.py`` (each constant names its sweep)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from mii import envs
from mii.ops import triton_limits
from mii.ops.dispatch import SKINNY_MAX_ROWS as MAX_ROWS


class GemvConfig(NamedTuple):
    """A launch of the skinny linear kernel."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = 16  # rows of x per program (tensor cores: at least 16; cores: 1, 2 or 4)
    split_k: int = 0  # programs sharing one output tile's K; 0: enough to fill the GPU
    # Weight columns per row each program prefetches into L2 while the previous
    # kernel runs (programmatic dependent launch, ops/triton_pdl.py); 0: none.
    prefetch_k: int = 1024
    # Float8 weights only: how they are converted (ops/triton_fp8.py): 0 Triton's
    # conversion instructions, 1 integer operations.
    dequant: int = 0
    # Float8 weights only: quantize each BLOCK_K slice of x's rows to e4m3 in the
    # kernel and multiply float8 by float8 (``dequant`` then unused).
    fp8_dot: bool = False
    # With fp8_dot: quantize x's BLOCK_K slices in a launch of their own first
    # (ops/triton_quant.quantize_groups_fp8), so that the weight loop holds no
    # reductions; the same numbers. One more launch per layer input.
    x_groups: bool = False
    # Multiply on the CUDA cores in float32, block_m (1, 2 or 4) rows of x per program,
    # the weights converted where they are loaded (``ops/triton_gemv_cores.py``): no padding
    # to 16 rows, and float8 weights read x unquantized. MII_GEMV_ONE_ROW.
    cores: bool = False


# From benchmarks/gemv_sweep.py on an H100 (2026-11-25, docs/performance.md): within
# 0.3 us of the best of 44 settings on each Llama-2-7B projection at 1 and 16 rows.
# 120 KB of bf16 pipeline stages; fewer stages where the GPU has less shared memory.
DEFAULT_CONFIG = GemvConfig(64, 128, num_warps=4, num_stages=6)
# Float8 weights: float8 products (x quantized per slice in the kernel; converting
# the weights to bf16 held the kernel to 28-39 % of the H200's copy bandwidth). From
# gemv_sweep --fp8 --fp8-sweep on an H200 (2026-12-03, 5c1c893, 1 row, Llama-2-7B):
# many 64-row bands (gate_up, 344): 64 x 256, 3 stages (3 programs per SM), 31.1 us;
# fewer bands than two per SM (qkv, 192): 128 x 256, 8 warps, 19.8 us; bands that
# split K (o, down: 4 ways): 64 x 256, 4 stages, 10.8 / 19.9 us (`fp8_config_for`).
# x quantized by a launch of its own (x_groups), both launches timed (gemv_sweep --fp8,
# H200, 2026-12-03, 792186b, 1 row): qkv 18.7 vs 20.0 us in the loop, gate_up 28.8 vs
# 30.5, down 18.4 vs 19.4, o 10.8 vs 10.6; the weight loop then holds no reductions.
# The production launch swept again (gemv_sweep --fp8 --fp8-sweep, H200, 2026-12-03,
# ec37e41, 1 and 16 rows, both launches timed): fewer bands than two per SM (qkv)
# now 64 x 256, 4 warps, 4 stages (17.9 / 18.6 us vs 18.4 / 19.4 for 128 x 256,
# 8 warps); K of at most UNSPLIT_MAX_K where 64-row bands would split it (o):
# 512-column slices, unsplit, 3 stages (9.6 / 9.7 us vs 10.7 / 11.3 split 4 ways);
# longer K (down, 11008) keeps the 4-way split (18.4 / 20.5 us, the best); many bands
# (gate_up) keep FP8_DEFAULT_CONFIG (29.0 / 30.0 us, the best).
FP8_DEFAULT_CONFIG = GemvConfig(64, 256, num_warps=4, num_stages=3, fp8_dot=True, x_groups=True)
FP8_FEW_BANDS_CONFIG = GemvConfig(
    64, 256, num_warps=4, num_stages=4, split_k=1, fp8_dot=True, x_groups=True
)
FP8_SPLIT_CONFIG = GemvConfig(64, 256, num_warps=4, num_stages=4, fp8_dot=True, x_groups=True)
FP8_SHORT_K_CONFIG = GemvConfig(
    64, 512, num_warps=4, num_stages=3, split_k=1, fp8_dot=True, x_groups=True
)
FP8_UNSPLIT_MAX_K = 4096
# More bands than FP8_DEFAULT_CONFIG runs at once (3 programs of 60 KB of stages per
# multiprocessor) but no more than 5 per multiprocessor: 128-column slices, 4 stages
# (40 KB), so that they all run in one wave. gemv_gated (H200, 2026-12-04, 7698b3a and
# 1cc0513, 1 row, act * up in the epilogue): Llama-3-8B's gate_up (448 bands on 132
# multiprocessors) 35.9 us vs 40.4 with FP8_DEFAULT_CONFIG, batch 1 end to end 331.3
# vs 314.7 tok/s; Llama-2-7B's (344 bands, one wave either way) 29.5 vs 28.9 us.
# Past 5 a multiprocessor (Llama-3-70B's 896 bands, K 8192) several waves remain
# either way and the wider slices win: 118.8 us vs 123.8, so the default stays.
FP8_MANY_BANDS_CONFIG = GemvConfig(64, 128, num_warps=4, num_stages=4, fp8_dot=True, x_groups=True)
FP8_DEFAULT_BANDS_PER_SM = 3
FP8_MANY_BANDS_PER_SM = 5
# Past 16 rows (not routed here yet; a first guess for the sweep to beat).
WIDE_CONFIG = GemvConfig(128, 64, num_warps=4, num_stages=3, block_m=64)


# 16-bit weights with fewer 64-row bands than two per multiprocessor (Llama-2-7B's
# qkv, o and down on an H200): 32-row bands, K unsplit. gemv_sweep (H200, 2026-12-03,
# 792186b, 1 row): o 11.4 vs 13.1 us, qkv 30.4 vs 31.9, down 26.9 vs 27.5 us for
# DEFAULT_CONFIG (the H100's choice; split-K 2 came second on o and down); 256-column
# slices where the 32-row bands are few (o, down), 128 where they are many (qkv).
NARROW_CONFIG = GemvConfig(32, 256, num_warps=4, num_stages=6, split_k=1)
NARROW_MANY_BANDS_CONFIG = GemvConfig(32, 128, num_warps=4, num_stages=6, split_k=1)


# One row on the CUDA cores (MII_GEMV_ONE_ROW, the default at batch 1).
# gemv_cores_sweep (H100, 2026-12-05, 169fe8b / the next commit, Llama-2-7B and
# Llama-3-8B projections, 1 row, ~100 launches per weight; docs/performance.md):
# - weights of few 8-row bands (at most CORES_FEW_BANDS_PER_SM per multiprocessor: o
#   and down, N 4096): 8-row bands of 1024-column slices on 4 warps (a [8, 1024]
#   float32 sum, 64 registers a thread), 3-4 stages: fp8 o 7.5 / down 18.3 us against
#   10.7 / 22.5 for the tensor-core launches, bf16 12.2 / 32.8-33.5 vs 12.7 / 35.9;
# - more bands (qkv, gate_up, lm_head): 4-row bands, 6 stages, 2 warps for float8
#   weights and 4 for 16-bit ones: fp8 qkv 20.1 / gate_up 35.0 us vs 22.0 / 37.2
#   (Llama-3-8B's gate_up 43.4 vs 49.6), bf16 qkv 34.8 / gate_up 62.0 / lm_head 87.3
#   vs 37.3 / 64.1 / 89.6.
# Swept again (H100, 2026-12-06, e05acf6, with 8 stages and the engine's own launch
# timed beside): 16-bit weights of few bands (still counted in CORES_CONFIG's 8-row
# bands) take 4-row bands of 2048-column slices instead (a [4, 2048] sum, the same 64
# registers): bf16 down 33.3 vs 34.6 us (Llama-3-8B 42.0 vs 43.1), o 12.7 vs 12.5 (o
# takes it too: one launch for both, the down projection's gain 6x o's loss); batch 1
# end to end +0.5 % on Llama-2-7B, even on Llama-3-8B (22d6a1f, alternated). The
# 16-bit launches also serve float32 weights, which no sweep timed.
CORES_CONFIG = GemvConfig(8, 1024, num_warps=4, num_stages=4, block_m=1, split_k=0, cores=True)
BF16_CORES_FEW_BANDS_CONFIG = CORES_CONFIG._replace(block_n=4, block_k=2048)
CORES_MANY_BANDS_CONFIG = CORES_CONFIG._replace(block_n=4, num_stages=6)
FP8_CORES_MANY_BANDS_CONFIG = CORES_MANY_BANDS_CONFIG._replace(num_warps=2)
CORES_FEW_BANDS_PER_SM = 4
# Rows up to which the CUDA-core launch applies (at most 4: each program takes them all).
CORES_MAX_ROWS = 1


def cores_for(rows: int, n: int, fp8: bool, device: torch.device) -> GemvConfig | None:
    """The CUDA-core launch for ``rows`` of x and ``n`` output channels where
    MII_GEMV_ONE_ROW asks for one (``cores``, the default: every weight;
    ``cores-fp8``: float8 weights), else None: by the weight's band count, as the
    sweep behind CORES_CONFIG found fastest."""
    choice = envs.GEMV_ONE_ROW.get()
    if rows > CORES_MAX_ROWS or choice == "tensor" or (choice == "cores-fp8" and not fp8):
        return None
    few_bands = CORES_FEW_BANDS_PER_SM * triton_limits.multiprocessors(device)
    if triton.cdiv(n, CORES_CONFIG.block_n) <= few_bands:
        config = CORES_CONFIG if fp8 else BF16_CORES_FEW_BANDS_CONFIG
    else:
        config = FP8_CORES_MANY_BANDS_CONFIG if fp8 else CORES_MANY_BANDS_CONFIG
    if rows <= 1:  # (0 rows: an empty batch, which the launch answers without a kernel)
        return config
    # Every row in one program (each weight converted once), the slices narrowed so
    # that the per-thread sums keep their register count.
    block_m = triton.next_power_of_2(rows)
    return config._replace(block_m=block_m, block_k=config.block_k // block_m)


def config_for(rows: int, fp8: bool = False) -> GemvConfig:
    """The launch for a batch of ``rows`` (of float8 weights with ``fp8``; the
    shape-aware choices are ``fp8_config_for`` and ``bf16_config_for``)."""
    if rows > MAX_ROWS:
        return WIDE_CONFIG
    return FP8_DEFAULT_CONFIG if fp8 else DEFAULT_CONFIG


def bf16_config_for(rows: int, n: int, device: torch.device) -> GemvConfig:
    """The 16/32-bit launch for ``rows`` of x and ``n`` output channels on ``device``:
    32-row bands where 64-row ones would leave multiprocessors with fewer than two,
    else ``config_for`` (the sweep behind it: NARROW_CONFIG)."""
    if rows > MAX_ROWS:
        return WIDE_CONFIG
    cores = cores_for(rows, n, False, device)
    if cores is not None:
        return cores
    twice_the_sms = 2 * triton_limits.multiprocessors(device)
    if triton.cdiv(n, DEFAULT_CONFIG.block_n) > twice_the_sms:
        return DEFAULT_CONFIG
    if triton.cdiv(n, NARROW_CONFIG.block_n) > twice_the_sms:
        return NARROW_MANY_BANDS_CONFIG
    return NARROW_CONFIG


def fp8_config_for(rows: int, n: int, k: int, device: torch.device) -> GemvConfig:
    """The float8 launch for ``rows`` of x and an [n, k] weight on ``device``: where
    64-row bands leave multiprocessors idle, K split (or, up to FP8_UNSPLIT_MAX_K,
    unsplit in wider slices); 4 stages where there are fewer than two bands per
    multiprocessor; narrower slices where there are more than the default launch
    runs at once but few enough for one wave of those (FP8_MANY_BANDS_CONFIG); else
    the default (sweeps: FP8_DEFAULT_CONFIG)."""
    if rows > MAX_ROWS:
        return WIDE_CONFIG._replace(fp8_dot=True)
    cores = cores_for(rows, n, True, device)
    if cores is not None:
        return cores
    bands = triton.cdiv(n, FP8_SPLIT_CONFIG.block_n)
    if _auto_splits(bands, k, device, FP8_MIN_K_PER_SPLIT) > 1:
        return FP8_SHORT_K_CONFIG if k <= FP8_UNSPLIT_MAX_K else FP8_SPLIT_CONFIG
    sms = triton_limits.multiprocessors(device)
    if bands <= 2 * sms:
        return FP8_FEW_BANDS_CONFIG
    if FP8_DEFAULT_BANDS_PER_SM * sms < bands <= FP8_MANY_BANDS_PER_SM * sms:
        return FP8_MANY_BANDS_CONFIG
    return FP8_DEFAULT_CONFIG


def fp8_products(config: GemvConfig, x_dtype: torch.dtype) -> bool:
    """Whether a float8-weight launch multiplies float8 by float8 (``fp8_dot``):
    float32 activations ask for precision and keep exact 32-bit products; a float8
    dot needs slices of at least 32 columns."""
    return config.fp8_dot and not config.cores and x_dtype != torch.float32 and config.block_k >= 32


def prequantized_slices(config: GemvConfig, x_dtype: torch.dtype) -> int:
    """The slice width at which a float8-weight launch reads x already quantized
    (``GemvConfig.x_groups``), or 0 where it quantizes x in its loop or not at all."""
    return config.block_k if fp8_products(config, x_dtype) and config.x_groups else 0


# Split-K (DEFAULT_CONFIG's automatic choice; bf16_config_for now picks unsplit
# 32-row bands wherever 64-row ones are few, from the H200 sweep, so on 132
# multiprocessors it applies only to explicit launches): each program still streams
# at least this many weight columns, and at most this many programs share a tile.
# From gemv_sweep on an H100 (2026-11-25, 5fe16bc): down_proj (K 11008) fastest in 2
# splits (38.2 us, 4 splits 41.0, none 39.7), o_proj (K 4096) unsplit (15.6 us, 4
# splits 18.0); 32-row bands were not in that sweep.
MIN_K_PER_SPLIT = 4096
# Float8 weights: half the bytes per column, and the H200 sweep (5c1c893) found 4
# splits fastest for o_proj (K 4096: 10.8 us, unsplit 12.6+) and down_proj (19.9 us).
FP8_MIN_K_PER_SPLIT = 1024
MAX_SPLIT_K = 8


def split_k_for(config: GemvConfig, tiles: int, k: int, device: torch.device) -> int:
    """How many programs share each output tile's K (``config.split_k``, or with 0
    enough for about two programs per multiprocessor, each streaming at least
    MIN_K_PER_SPLIT columns: with 4096 output rows a 64-row band leaves half an
    H100 idle)."""
    splits = config.split_k
    if splits == 0:
        # (a CUDA-core launch, float8 or not, takes the 16-bit minimum: how the sweep
        # behind CORES_CONFIG timed it, never splitting Llama's weights on 132 SMs)
        min_k = FP8_MIN_K_PER_SPLIT if config.fp8_dot else MIN_K_PER_SPLIT
        splits = _auto_splits(tiles, k, device, min_k)
    return splits


def _auto_splits(tiles: int, k: int, device: torch.device, min_k_per_split: int) -> int:
    """About two programs per multiprocessor, each streaming >= ``min_k_per_split``."""
    splits = min(MAX_SPLIT_K, max(1, 2 * triton_limits.multiprocessors(device) // tiles))
    return min(splits, max(1, k // min_k_per_split))
