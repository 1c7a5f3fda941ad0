"""The grouped expert kernel (``ops/triton_moe.py``) on one Mixtral-8x7B-shaped
layer (H 4096, I 14336, 8 experts, top 2): bf16 experts against float8 e4m3
experts (per expert and output channel scales; float8 products by default), at
several token counts, with a sweep of tile settings for the float8 kernel.

    python benchmarks/moe_fp8.py [--tokens 1 16 128 1024 4096] [--no-sweep] [--bf16-sweep]
        [--routing] [--grouped-mm] [--down-sweep] [--json out.json]

Reports microseconds, the expert-weight bytes read over the copy bandwidth (few
tokens: each chosen expert's weights once, 2 bytes a weight in bf16, 1 in fp8)
and TFLOP/s (many tokens). Each timing replays a CUDA graph of the whole expert
MLP (routing layout, both grouped GEMMs, the activation), as decode runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os

import torch

from benchmarks.common import environment, roofline, write_json
from benchmarks.kernel_times import bench, bench_graph

HIDDEN, INTER, EXPERTS, TOP_K = 4096, 14336, 8, 2


def candidates() -> list:
    """Tile settings the float8 sweep tries (kernels.py's bf16 candidates, plus
    wider K for float8's one-byte weights), with float8 and with 16-bit products."""
    from mii.ops.triton_moe import TileConfig

    tiles = [
        TileConfig(16, 64, 128),
        TileConfig(16, 64, 256, num_warps=4, num_stages=4),
        TileConfig(16, 128, 256, num_warps=4, num_stages=4),
        TileConfig(16, 64, 512, num_warps=4, num_stages=3),
        TileConfig(32, 64, 128),
        TileConfig(64, 128, 64, num_warps=8, num_stages=4),
        TileConfig(64, 128, 128, num_warps=8, num_stages=3),
        TileConfig(128, 128, 64, num_warps=8),
        TileConfig(128, 256, 64, num_warps=8),
        TileConfig(128, 256, 128, num_warps=8, num_stages=3),
    ]
    # Each tile with float8 products, with the activations quantized once before
    # each GEMM (TileConfig.a_groups, the default), and with the weights converted
    # to bf16 for 16-bit products (TileConfig.fp8_dot).
    # The prompt-sized tiles also in the L2-friendly program order (TileConfig.group_m).
    ordered = [t._replace(a_groups=True, group_m=8) for t in tiles if t.block_m >= 64]
    # The decode-sized tiles also computed transposed (TileConfig.swap_ab: the weights
    # on the tensor cores' 64-row side, float8 wgmma instead of converted weights).
    swapped = [t._replace(a_groups=True, swap_ab=True) for t in tiles if t.block_m <= 32]
    return (
        tiles
        + [t._replace(a_groups=True) for t in tiles]
        + [t._replace(fp8_dot=False) for t in tiles]
        + ordered
        + swapped
    )


def bf16_candidates() -> list:
    """Tile settings for bf16 experts (``--bf16-sweep``: the defaults came from an H100)."""
    return list(dict.fromkeys(t._replace(a_groups=False, fp8_dot=True) for t in candidates()))


def down_candidates(tiles) -> list:
    """Tiles for the down projection alone (``moe_grouped_mlp(down_tiles=...)``): the
    layout's ``block_m`` kept, narrower column blocks (Mixtral's hidden size of 4,096
    makes 64 blocks of 64 per expert: about one program per SM at batch 1)."""
    return [
        tiles._replace(block_n=n, block_k=k, num_warps=4, num_stages=stages)
        for n in (16, 32, 64)
        for k in (128, 256, 512)
        for stages in (3, 4)
    ]


def _top(sweep: dict, count: int = 5) -> list:
    """The ``count`` fastest settings of a sweep: [[microseconds, tiles], ...]."""
    ranked = sorted(sweep.items(), key=lambda item: item[1])[:count]
    return [[round(s * 1e6, 1), list(tiles)] for tiles, s in ranked]


def main() -> None:
    from mii.models.moe import SparseMoE
    from mii.models.weight_quant import fp8_weights
    from mii.ops.fp8_linear import dequantize_rows, quantize_rows
    from mii.ops.triton_moe import default_tiles, moe_grouped_mlp

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    parser.add_argument("--no-sweep", action="store_true", help="default tiles only")
    parser.add_argument("--bf16-sweep", action="store_true", help="sweep bf16 experts' tiles too")
    parser.add_argument(
        "--routing",
        action="store_true",
        help="time the whole layer with MII_MOE_ROUTING=torch and =fused",
    )
    parser.add_argument(
        "--grouped-mm",
        action="store_true",
        help="time bf16 experts through torch._grouped_mm too (MII_MOE_PROMPT_GEMM=grouped_mm)",
    )
    parser.add_argument(
        "--down-sweep",
        action="store_true",
        help="sweep the down projection's own tiles at decode sizes (<= 256 pairs)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {"benchmark": "moe_fp8", **environment(), "roofline": roofline(device)}
    copy_bw = result["roofline"]["copy_tb_per_s"] * 1e12
    with torch.device(device), fp8_weights("online"):
        moe = SparseMoE(HIDDEN, INTER, EXPERTS, TOP_K)
    moe.gate.to(torch.bfloat16)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02)
        for name in ("w13", "w2"):  # one expert at a time: bounded temporaries
            weight, scale = getattr(moe, name), getattr(moe, f"{name}_scale")
            for e in range(EXPERTS):
                w = torch.randn(weight.shape[1:], device=device, dtype=torch.bfloat16) * 0.02
                weight[e], scale[e] = quantize_rows(w)
    w13_bf16 = dequantize_rows(moe.w13, moe.w13_scale, torch.bfloat16)
    w2_bf16 = dequantize_rows(moe.w2, moe.w2_scale, torch.bfloat16)
    routing_default = os.environ.get("MII_MOE_ROUTING")  # unset: the switch's default
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            weights, chosen = moe.route(x)

            def bf16(tiles=None, x=x, weights=weights, chosen=chosen, down_tiles=None):
                return moe_grouped_mlp(
                    x,
                    w13_bf16,
                    w2_bf16,
                    weights,
                    chosen,
                    moe.act,
                    tiles,
                    fused_activation="silu",
                    down_tiles=down_tiles,
                )

            def fp8(tiles=None, x=x, weights=weights, chosen=chosen, down_tiles=None):
                return moe_grouped_mlp(
                    x,
                    moe.w13,
                    moe.w2,
                    weights,
                    chosen,
                    moe.act,
                    tiles,
                    moe.w13_scale,
                    moe.w2_scale,
                    fused_activation="silu",
                    down_tiles=down_tiles,
                )

            error = (fp8().float() - bf16().float()).norm() / bf16().float().norm()
            bf16_s, fp8_s = bench_graph(bf16), bench_graph(fp8)
            sweep = {default_tiles(tokens * TOP_K, fp8=True): fp8_s}
            for tiles in [] if args.no_sweep else candidates():
                try:
                    sweep[tiles] = bench_graph(lambda tiles=tiles: fp8(tiles))
                except Exception as err:  # a setting this GPU cannot launch
                    print(f"tokens {tokens} {tiles}: {type(err).__name__}")
            bf16_sweep = {}
            for tiles in bf16_candidates() if args.bf16_sweep else []:
                try:
                    bf16_sweep[tiles] = bench_graph(lambda tiles=tiles: bf16(tiles))
                except Exception as err:
                    print(f"tokens {tokens} bf16 {tiles}: {type(err).__name__}")
            down = {}
            if args.down_sweep and tokens * TOP_K <= 256:
                for name, run in (("bf16", bf16), ("fp8", fp8)):
                    base = default_tiles(tokens * TOP_K, fp8=name == "fp8")
                    timed = {}
                    for cand in down_candidates(base):
                        try:
                            timed[cand] = bench_graph(
                                lambda run=run, base=base, cand=cand: run(base, down_tiles=cand)
                            )
                        except Exception as err:  # a setting this GPU cannot launch
                            print(f"tokens {tokens} {name} down {cand}: {type(err).__name__}")
                    down[name] = timed
            grouped_mm = {}
            if args.grouped_mm:
                from mii.ops.moe_grouped_mm import moe_mlp_grouped_mm

                def through_grouped_mm(x=x, weights=weights, chosen=chosen):
                    return moe_mlp_grouped_mm(
                        x, w13_bf16, w2_bf16, weights, chosen, moe.act, "silu"
                    )

                reference = bf16().float()
                grouped_mm["error"] = (
                    (through_grouped_mm().float() - reference).norm() / reference.norm()
                ).item()
                try:
                    grouped_mm["seconds"] = bench_graph(through_grouped_mm)
                except RuntimeError as err:  # not capturable here: time it eagerly
                    print(f"tokens {tokens} grouped_mm in a graph: {err!r:.120}; eager")
                    grouped_mm["seconds"] = bench(through_grouped_mm)
            layer = {}
            for fused_routing in (False, True) if args.routing else ():
                # The whole layer (router GEMV, routing, layout, experts), both ways.
                os.environ["MII_MOE_ROUTING"] = "fused" if fused_routing else "torch"
                layer[fused_routing] = bench_graph(lambda x=x: moe(x))
            if routing_default is None:
                os.environ.pop("MII_MOE_ROUTING", None)
            else:
                os.environ["MII_MOE_ROUTING"] = routing_default
        best = min(sweep, key=sweep.get)
        used = chosen.unique().numel()
        params = used * 3 * HIDDEN * INTER
        flops = 2 * tokens * TOP_K * 3 * HIDDEN * INTER
        row = {
            "tokens": tokens,
            "bf16_us": round(bf16_s * 1e6, 1),
            "fp8_us": round(fp8_s * 1e6, 1),
            "fp8_speedup": round(bf16_s / fp8_s, 2),
            "bf16_weight_fraction_of_copy": round(2 * params / bf16_s / copy_bw, 3),
            "fp8_weight_fraction_of_copy": round(params / fp8_s / copy_bw, 3),
            "bf16_tflops": round(flops / bf16_s / 1e12, 1),
            "fp8_tflops": round(flops / fp8_s / 1e12, 1),
            "fp8_vs_bf16_relative_error": round(error.item(), 4),
            "fp8_best_tiles": list(best),
            "fp8_best_us": round(sweep[best] * 1e6, 1),
            "fp8_top5": _top(sweep),
        }
        if bf16_sweep:
            row["bf16_top5"] = _top(bf16_sweep)
        for name, timed in down.items():
            row[f"{name}_down_top5"] = _top(timed)
        if grouped_mm:
            row["bf16_grouped_mm_us"] = round(grouped_mm["seconds"] * 1e6, 1)
            row["bf16_grouped_mm_tflops"] = round(flops / grouped_mm["seconds"] / 1e12, 1)
            row["bf16_grouped_mm_vs_triton_relative_error"] = round(grouped_mm["error"], 5)
        if layer:
            row["fp8_layer_us"] = round(layer[False] * 1e6, 1)
            row["fp8_layer_fused_routing_us"] = round(layer[True] * 1e6, 1)
        rows.append(row)
        print(
            f"tokens {tokens:5d}  bf16 {row['bf16_us']:8.1f} us  fp8 {row['fp8_us']:8.1f} us "
            f"({row['fp8_weight_fraction_of_copy']:.0%} of copy bw)  best fp8 "
            f"{row['fp8_best_us']} us {row['fp8_best_tiles']}"
            + (f"  best bf16 {row['bf16_top5'][0]}" if bf16_sweep else "")
            + "".join(f"  {name} best down {row[f'{name}_down_top5'][0]}" for name in down)
            + (
                f"  bf16 grouped_mm {row['bf16_grouped_mm_us']} us "
                f"({row['bf16_grouped_mm_tflops']} TFLOP/s, bf16 Triton {row['bf16_tflops']})"
                if grouped_mm
                else ""
            )
            + (
                f"  layer {row['fp8_layer_us']} us, fused routing "
                f"{row['fp8_layer_fused_routing_us']} us"
                if layer
                else ""
            ),
            flush=True,
        )
    result["rows"] = rows
    write_json(args.json, result)


if __name__ == "__main__":
    main()
