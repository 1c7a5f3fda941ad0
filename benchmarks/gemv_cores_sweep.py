"""Batch 1 on the CUDA cores (``GemvConfig.cores``, ``MII_GEMV_ONE_ROW``) against the
skinny kernel's production launches, per Llama projection: a diagnostic whose best
rows set ``CORES_CONFIG`` and its many-band forms and whether the switch's default
should move.

    python benchmarks/gemv_cores_sweep.py [--model llama3-8b] [--rows 1] [--json out.json]
    python benchmarks/gemv_cores_sweep.py --rows 2 4   # decode batches of 2 and 4 rows

For each projection (float8 e4m3 weights with channel scales, and bf16 weights) it
times, as ``gemv_sweep.py`` does (a CUDA graph over copies of the weight past the
L2 cache): the production launch (``fp8_config_for`` / ``bf16_config_for`` with
MII_GEMV_ONE_ROW=tensor; float8: qkv's and gate_up's x pre-quantized, as the RMSNorm
writes it, o's and down's quantized by their own launch, timed with it, as
production runs them), then CUDA-core launches in two rounds: tiles (rows of x
per program: one, or all of them up to 4; rows per band, slice width, warps) at 3
stages, then the three best tiles' stages, K splits and PDL prefetch depth.
Fractions are of the copy bandwidth for each weight's own bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import itertools
import os

import torch
import triton

from benchmarks.common import environment, roofline, sweep_summary, write_json
from benchmarks.gemv_sweep import LLAMA3_SHAPES, SHAPES, graph_seconds
from mii.ops import fp8_activations
from mii.ops.fp8_linear import quantize_rows
from mii.ops.triton_gemv import skinny_linear, skinny_linear_fp8
from mii.ops.triton_gemv_launch import GemvConfig, bf16_config_for, cores_for, fp8_config_for
from mii.ops.triton_quant import quantize_groups_fp8

# The projections whose input the RMSNorm writes (with its float8 copy at batch 1).
NORM_INPUTS = ("qkv", "gate_up")


def tile_configs(rows: int) -> list[GemvConfig]:
    """Round one: rows of x per program (1, or all of them up to 4), rows per band,
    slice width and warps, keeping the per-thread float32 sums (block_m * block_n *
    block_k / threads) at 16-64 registers; 3 stages, K auto-split."""
    out = []
    row_tiles = sorted({1, min(4, triton.next_power_of_2(rows))})
    space = itertools.product(row_tiles, (4, 8, 16, 32), (256, 512, 1024, 2048, 4096), (2, 4, 8))
    for block_m, block_n, block_k, warps in space:
        if 16 <= block_m * block_n * block_k // (32 * warps) <= 64:
            out.append(
                GemvConfig(block_n, block_k, warps, 3, block_m=block_m, split_k=0, cores=True)
            )
    return out


def depth_configs(best: list[GemvConfig]) -> list[GemvConfig]:
    """Round two: the best tiles with 2-8 stages (more bytes in flight for the H200's
    bandwidth), K unsplit or split 2 ways, and 0-4096 weight columns a row prefetched
    into L2 before the predecessor finishes (PDL)."""
    return [
        cfg._replace(num_stages=stages, split_k=splits, prefetch_k=prefetch)
        for cfg in best
        for stages, splits, prefetch in itertools.product((2, 3, 4, 6, 8), (0, 2), (0, 1024, 4096))
    ]


def timed_sweep(
    name: str,
    rows: int,
    calls_for,
    nbytes: int,
    default_s: float,
    copy_bw: float,
    current: GemvConfig | None,
) -> dict:
    """Both rounds for one weight; ``calls_for(config)`` -> the closures to time;
    ``current``: the engine's own CUDA-core launch for this weight, reported apart."""
    timed: dict[GemvConfig, float] = {}

    def run(configs):
        for cfg in configs:
            if cfg in timed:
                continue
            try:
                timed[cfg] = graph_seconds(calls_for(cfg))
            except Exception as error:  # a setting this GPU cannot launch
                print(f"{name} {cfg}: {type(error).__name__}: {str(error)[:120]}", flush=True)

    run(tile_configs(rows) + ([current] if current is not None else []))
    ranked = sorted(timed, key=timed.get)
    run(depth_configs(ranked[:3]))
    ordered = sorted((s, c) for c, s in timed.items())
    summary = sweep_summary(ordered, default_s, nbytes, copy_bw)
    if current in timed:
        summary["cores_current_us"] = round(timed[current] * 1e6, 1)
        summary["cores_current_of_copy_bw"] = round(nbytes / timed[current] / copy_bw, 3)
    return summary


def shape_rows(shapes: dict, rows: int, copy_bw: float, device) -> list[dict]:
    """One row per projection: the production launches and the CUDA-core sweeps."""
    out = []
    for name, (n, k) in shapes.items():
        row = {"shape": name, "rows": rows, "n": n, "k": k}
        # > 256 MiB of float8 weights in all: each call reads its copy from memory
        copies = max(2, -(-256 * 2**20 // (n * k)))
        weights = [
            torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)
        ]
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        if name != "lm_head":  # the LM head stays 16-bit
            row["fp8"] = fp8_sweep(name, x, [quantize_rows(w) for w in weights], copy_bw)
        row["bf16"] = bf16_sweep(name, x, weights, copy_bw)
        out.append(row)
        for kind in ("fp8", "bf16"):
            if kind in row:
                r = row[kind]
                print(
                    f"{name:8s} M={rows} {kind:4s} production {r['default_us']:6.1f} us "
                    f"({r['default_of_copy_bw']:.0%})  cores best {r['best_us']:6.1f} us "
                    f"({r['best_of_copy_bw']:.0%}) {r['best']}  engine's cores "
                    f"{r.get('cores_current_us', float('nan')):6.1f} us",
                    flush=True,
                )
    return out


def fp8_sweep(name: str, x: torch.Tensor, quantized: list, copy_bw: float) -> dict:
    """Float8 weights: the production launch (its x as production gives it), then cores."""
    n, k = quantized[0][0].shape
    # the production launch before this session's: the cores are timed with explicit
    # configs (this script's process only)
    os.environ["MII_GEMV_ONE_ROW"] = "tensor"
    default = fp8_config_for(x.shape[0], n, k, x.device)
    x_in = x
    if name in NORM_INPUTS and default.x_groups:
        x_in = x.clone()  # its own tensor: only these calls read the copy attached
        fp8_activations.attach(x_in, *quantize_groups_fp8(x_in, default.block_k), default.block_k)
    default_s = graph_seconds(
        [lambda q=q: skinny_linear_fp8(x_in, *q, None, default) for q in quantized]
    )

    def calls_for(cfg):
        return [lambda q=q: skinny_linear_fp8(x, *q, None, cfg) for q in quantized]

    current = _engine_cores(x.shape[0], n, True, x.device)
    return timed_sweep(f"{name} fp8", x.shape[0], calls_for, n * k, default_s, copy_bw, current)


def bf16_sweep(name: str, x: torch.Tensor, weights: list, copy_bw: float) -> dict:
    """16-bit weights: the production launch, then cores."""
    n, k = weights[0].shape
    os.environ["MII_GEMV_ONE_ROW"] = "tensor"
    default = bf16_config_for(x.shape[0], n, x.device)
    default_s = graph_seconds([lambda w=w: skinny_linear(x, w, None, default) for w in weights])

    def calls_for(cfg):
        return [lambda w=w: skinny_linear(x, w, None, cfg) for w in weights]

    current = _engine_cores(x.shape[0], n, False, x.device)
    return timed_sweep(
        f"{name} bf16", x.shape[0], calls_for, 2 * n * k, default_s, copy_bw, current
    )


def _engine_cores(rows: int, n: int, fp8: bool, device: torch.device) -> GemvConfig | None:
    """The CUDA-core launch the engine takes by default for this weight (None: none)."""
    os.environ["MII_GEMV_ONE_ROW"] = "cores"
    try:
        return cores_for(rows, n, fp8, device)
    finally:
        os.environ["MII_GEMV_ONE_ROW"] = "tensor"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--model", choices=["llama2-7b", "llama3-8b"], default="llama2-7b")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shapes = LLAMA3_SHAPES if args.model == "llama3-8b" else SHAPES
    device = torch.device("cuda")
    result = {"benchmark": "gemv_cores_sweep", **environment(), "roofline": roofline(device)}
    copy_bw = result["roofline"]["copy_tb_per_s"] * 1e12
    result["rows"] = [
        row for rows in args.rows for row in shape_rows(shapes, rows, copy_bw, device)
    ]
    write_json(args.json, result)


if __name__ == "__main__":
    main()
