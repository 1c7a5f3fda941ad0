"""Launch settings of the skinny linear kernel (``ops/triton_gemv.py``) against
``F.linear`` (cuBLAS) on the Llama-2-7B projections at decode batch sizes: a
diagnostic whose best rows set ``DEFAULT_CONFIG``.

Each timing replays a CUDA graph (as decode runs) over several copies of the
weight, together larger than the L2 cache, so every call reads its weight from
memory as consecutive layers do.

    python benchmarks/gemv_sweep.py [--rows 1 16] [--json out.json]
    python benchmarks/gemv_sweep.py --rows 64 128 256   # is the kernel ahead of cuBLAS there?
    python benchmarks/gemv_sweep.py --fp8 [--rows 1 4 16 64]   # float8 weights (below)
    python benchmarks/gemv_sweep.py --fp8 --fp8-sweep --rows 1 16   # + fp8 launch settings
    python benchmarks/gemv_sweep.py --fp8 --fp8-sweep --rows 1 --model llama3-8b

With ``--fp8`` each shape and batch instead times, side by side: bf16 cuBLAS and
the bf16 skinny kernel (default launch), and on float8 e4m3 weights with
per-channel scales the float8 skinny kernel (``skinny_linear_fp8``, default
launch) and ``torch._scaled_mm`` (per-token activation quantization included, as
``ops.fp8_linear`` runs it); each as a fraction of the copy bandwidth for the
bytes of its own weight (``fp8_skinny_bf16``: the float8 kernel's default tile
converting the weights to bf16 for 16-bit products, not quantizing x for float8
products: ``GemvConfig.fp8_dot``; ``fp8_skinny_in_loop``: the default launch with x
quantized in the weight loop rather than by a launch of its own first, which the
default times with it: ``GemvConfig.x_groups``).
``--fp8-sweep`` adds a sweep of the float8 kernel's launch settings (the row's
``best``; what ``FP8_DEFAULT_CONFIG`` should become).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from benchmarks.common import (
    LLAMA2_7B,
    LLAMA3_8B,
    environment,
    projection_shapes,
    roofline,
    sweep_summary,
    write_json,
)
from mii.ops.triton_gemv import skinny_linear, skinny_linear_fp8
from mii.ops.triton_gemv_launch import (
    DEFAULT_CONFIG,
    FP8_DEFAULT_CONFIG,
    GemvConfig,
    bf16_config_for,
    config_for,
    fp8_config_for,
)

SHAPES = projection_shapes(LLAMA2_7B)  # name: (N, K) of the weight
# Llama-3-8B (GQA 32/8, intermediate 14336): --model llama3-8b; its layers only
LLAMA3_SHAPES = {n: s for n, s in projection_shapes(LLAMA3_8B).items() if n != "lm_head"}
SHARED_MEMORY_BUDGET = 160 * 1024


def graph_seconds(calls) -> float:
    """Seconds per call of ``calls`` (a list of closures) replayed from one graph."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    total = triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median")
    return total / 1e3 / len(calls)


def configs(rows: int, default: GemvConfig) -> list[GemvConfig]:
    """Settings to time at ``rows``: one 16-row tile up to 16 rows, else row tiles
    of 32-128 (where the kernel turns from reading weights to multiplying), and the
    engine's ``default`` for the shape."""
    out = []
    if rows <= 16:
        space = itertools.product((16,), (16, 32, 64, 128), (128, 256, 512), (4, 8), (3, 4, 6))
    else:
        space = itertools.product((32, 64, 128), (64, 128), (64, 128), (4, 8), (3, 4))
    for block_m, block_n, block_k, warps, stages in space:
        if (block_n + block_m) * block_k * 2 * stages <= SHARED_MEMORY_BUDGET:
            out.append(GemvConfig(block_n, block_k, warps, stages, block_m, split_k=1))
    if rows <= 16:  # the default tile with K split automatically (0) or 2-8 ways
        out += [DEFAULT_CONFIG._replace(split_k=splits) for splits in (0, 2, 4, 8)]
    if default not in out:
        out.append(default)
    return out


def fp8_configs(rows: int) -> list[GemvConfig]:
    """Float8 launch settings to time at ``rows`` (<= 16): one byte per weight, so
    wider K slices for the same bytes in flight; float8 products with x quantized
    by its own launch (the default, ``x_groups``) or in the weight loop."""
    out = []
    space = itertools.product(
        (16,), (32, 64, 128), (128, 256, 512), (4, 8), (3, 4, 6), (True, False)
    )
    for block_m, block_n, block_k, warps, stages, x_groups in space:
        if (block_n + 2 * block_m) * block_k * stages <= SHARED_MEMORY_BUDGET:
            out.append(
                GemvConfig(
                    block_n, block_k, warps, stages, block_m, 1, fp8_dot=True, x_groups=x_groups
                )
            )
    # 32- and 64-row bands with K split 2-8 ways (o and down have few bands).
    for block_n, splits in itertools.product((32, 64), (0, 2, 4, 8)):
        out.append(FP8_DEFAULT_CONFIG._replace(block_n=block_n, split_k=splits, num_stages=4))
    return out


def bf16_product_config(rows: int) -> GemvConfig:
    """The float8 default launch at ``rows``, but converting the weights to bf16 and
    multiplying 16-bit (the launch before float8 products)."""
    return config_for(rows, fp8=True)._replace(fp8_dot=False)


def fp8_rows(
    shapes: dict, batch_rows: list[int], copy_bw: float, device, sweep: bool = False
) -> list[dict]:
    """bf16 cuBLAS, the bf16 skinny kernel, and on fp8 weights the fp8 skinny kernel
    and ``torch._scaled_mm`` (see the module docstring), per shape and batch size;
    with ``sweep``, the fp8 kernel's launch settings too (at most 16 rows)."""
    from mii.ops.fp8_linear import fp8_linear_scaled_mm, quantize_rows

    out = []
    for name, (n, k) in shapes.items():
        copies = max(2, -(-256 * 2**20 // (n * k)))  # > 256 MiB of float8 weights: past the L2
        weights = [
            torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)
        ]
        quantized = [quantize_rows(w) for w in weights]
        for rows in batch_rows:
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            as_bf16 = bf16_product_config(rows)
            in_loop = [fp8_config_for(rows, n, k, device)._replace(x_groups=False)]
            timings = {
                "bf16_cublas": [lambda w=w, x=x: F.linear(x, w) for w in weights],
                "bf16_skinny": [lambda w=w, x=x: skinny_linear(x, w) for w in weights],
                "fp8_skinny": [lambda q=q, x=x: skinny_linear_fp8(x, *q) for q in quantized],
                # The default tile with the weights converted to bf16 (no float8 products).
                "fp8_skinny_bf16": [
                    lambda q=q, x=x, c=as_bf16: skinny_linear_fp8(x, *q, None, c) for q in quantized
                ],
                # The default launch with x quantized in the weight loop (not x_groups).
                "fp8_skinny_in_loop": [
                    lambda q=q, x=x, c=in_loop[0]: skinny_linear_fp8(x, *q, None, c)
                    for q in quantized
                ],
                "fp8_scaled_mm": [lambda q=q, x=x: fp8_linear_scaled_mm(x, *q) for q in quantized],
            }
            row = {"shape": name, "rows": rows, "n": n, "k": k}
            for label, calls in timings.items():
                nbytes = n * k * (1 if label.startswith("fp8") else 2)
                try:
                    s = graph_seconds(calls)
                except Exception as error:  # e.g. a GPU without FP8 tensor cores
                    row[f"{label}_error"] = f"{type(error).__name__}: {error}"[:200]
                    continue
                row[f"{label}_us"] = round(s * 1e6, 1)
                row[f"{label}_of_copy_bw"] = round(nbytes / s / copy_bw, 3)
            if sweep and rows <= 16:
                timed = []
                for cfg in fp8_configs(rows):
                    calls = [
                        lambda q=q, x=x, c=cfg: skinny_linear_fp8(x, *q, None, c) for q in quantized
                    ]
                    try:
                        timed.append((graph_seconds(calls), cfg))
                    except Exception as error:  # a setting this GPU cannot launch
                        print(f"{name} {rows} {cfg}: {type(error).__name__}")
                if timed:
                    timed.sort()
                    default_s = row.get("fp8_skinny_us", float("nan")) / 1e6
                    summary = sweep_summary(timed, default_s, n * k, copy_bw)
                    keys = ("best_us", "best_of_copy_bw", "best", "top5")
                    row["fp8_sweep"] = {key: summary[key] for key in keys}
            out.append(row)
            print(
                f"{name:8s} M={rows:3d}  "
                + "  ".join(
                    f"{label} {row.get(f'{label}_us', float('nan')):7.1f} us "
                    f"({row.get(f'{label}_of_copy_bw', float('nan')):.0%})"
                    for label in timings
                )
                + (
                    f"  fp8 best {row['fp8_sweep']['best_us']} us {row['fp8_sweep']['best']}"
                    if "fp8_sweep" in row
                    else ""
                ),
                flush=True,
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--fp8", action="store_true", help="float8 weights: skinny kernels vs torch._scaled_mm"
    )
    parser.add_argument(
        "--fp8-sweep", action="store_true", help="with --fp8: sweep the fp8 kernel's launches"
    )
    parser.add_argument("--model", choices=["llama2-7b", "llama3-8b"], default="llama2-7b")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shapes = LLAMA3_SHAPES if args.model == "llama3-8b" else SHAPES
    device = torch.device("cuda")
    result = {"benchmark": "gemv_sweep", **environment(), "roofline": roofline(device)}
    copy_bw = result["roofline"]["copy_tb_per_s"] * 1e12
    if args.fp8:
        result["benchmark"] = "gemv_fp8"
        result["rows"] = fp8_rows(shapes, args.rows, copy_bw, device, args.fp8_sweep)
        write_json(args.json, result)
        return
    rows_out = []
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, -(-256 * 2**20 // nbytes))  # > 256 MiB in all: past the L2
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        for rows in args.rows:
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            cublas = graph_seconds([lambda w=w, x=x: F.linear(x, w) for w in weights])
            default = bf16_config_for(rows, n, device)  # what skinny_linear launches
            timed = []
            for cfg in configs(rows, default):
                try:
                    calls = [lambda w=w, x=x, c=cfg: skinny_linear(x, w, None, c) for w in weights]
                    s = graph_seconds(calls)
                except Exception as error:  # a setting this GPU cannot launch
                    print(f"{name} {rows} {cfg}: {type(error).__name__}")
                    continue
                timed.append((s, cfg))
            timed.sort()
            default_s = next((s for s, c in timed if c == default), float("nan"))
            row = {
                "shape": name,
                "rows": rows,
                "cublas_us": round(cublas * 1e6, 1),
                "cublas_of_copy_bw": round(nbytes / cublas / copy_bw, 3),
                "cublas_tflops": round(2 * rows * n * k / cublas / 1e12, 1),
            }
            row |= sweep_summary(timed, default_s, nbytes, copy_bw)
            row["best_tflops"] = round(2 * rows * n * k / timed[0][0] / 1e12, 1)
            rows_out.append(row)
            print(
                f"{name:8s} M={rows:2d}  cuBLAS {row['cublas_us']:7.1f} us "
                f"({row['cublas_of_copy_bw']:.0%})  best {row['best_us']:7.1f} us "
                f"({row['best_of_copy_bw']:.0%}) {row['best']}  default {row['default_us']:.1f} us",
                flush=True,
            )
    result["rows"] = rows_out
    write_json(args.json, result)


if __name__ == "__main__":
    main()
