"""The decode gate/up projection two ways, at 1 and 16 rows: the skinny kernel's
projection followed by the act(gate) * up launch (``fused_elementwise.act_and_mul``),
against ``skinny_gated_linear`` (act * up in the projection's epilogue), on bf16
and on float8 weights, plus a sweep of the gated kernel's launch settings: a
diagnostic for ``MII_GATED_GEMV`` (on for float8 weights only, because end to end
the gated bf16 launch lost ~3 %; this says whether the kernel itself is slower
and whether another tile closes the gap).

    python benchmarks/gemv_gated.py [--rows 1 16] [--no-sweep] [--json out.json]
    python benchmarks/gemv_gated.py --fp8-only --shapes llama3-8b llama3-70b

Timed as ``gemv_sweep.py`` times (CUDA graph replays over copies of the weight
larger than the L2 cache); each time also as a fraction of the copy bandwidth for
the weight's own bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import itertools

import torch

from benchmarks.common import SHAPES as MODELS
from benchmarks.common import environment, roofline, sweep_summary, write_json
from benchmarks.gemv_sweep import SHARED_MEMORY_BUDGET, graph_seconds
from mii.ops.fp8_linear import quantize_rows
from mii.ops.fused_elementwise import act_and_mul
from mii.ops.triton_gemv import skinny_gated_linear, skinny_linear, skinny_linear_fp8
from mii.ops.triton_gemv_launch import GemvConfig

SHAPES = {  # (I, K): the weight is [2 I, K]
    name: (MODELS[name]["intermediate_size"], MODELS[name]["hidden_size"])
    for name in ("llama2-7b", "llama3-8b", "llama3-70b")
}


def gated_configs(fp8: bool) -> list[GemvConfig]:
    """Launches of the gated kernel to time (one 16-row tile of x)."""
    out = []
    space = itertools.product((32, 64, 128), (64, 128, 256, 512), (4, 8), (3, 4, 6))
    width = 1 if fp8 else 2
    for block_n, block_k, warps, stages in space:
        if (block_n + 16) * block_k * width * stages > SHARED_MEMORY_BUDGET:
            continue
        if fp8 and block_k < 128:
            continue
        cfg = GemvConfig(block_n, block_k, warps, stages, 16, split_k=1)
        out.append(cfg._replace(fp8_dot=True, x_groups=True) if fp8 else cfg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument(
        "--shapes", nargs="+", choices=list(SHAPES), default=["llama2-7b", "llama3-8b"]
    )
    parser.add_argument("--fp8-only", action="store_true", help="float8 weights only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {"benchmark": "gemv_gated", **environment(), "roofline": roofline(device)}
    copy_bw = result["roofline"]["copy_tb_per_s"] * 1e12
    rows_out = []
    shapes = {name: SHAPES[name] for name in args.shapes}
    dtypes = (True,) if args.fp8_only else (False, True)
    for (name, (i, k)), fp8 in itertools.product(shapes.items(), dtypes):
        n = 2 * i
        nbytes = n * k * (1 if fp8 else 2)
        copies = max(2, -(-256 * 2**20 // nbytes))  # > 256 MiB in all: past the L2
        weights = [
            torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)
        ]
        if fp8:
            weights = [quantize_rows(w) for w in weights]  # (float8 weight, scale)
        for rows in args.rows:
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)

            def two_launches(w, x=x, fp8=fp8):
                y = skinny_linear_fp8(x, *w) if fp8 else skinny_linear(x, w)
                return act_and_mul(y, "silu")

            def gated(w, x=x, cfg=None, fp8=fp8):
                if fp8:
                    return skinny_gated_linear(x, w[0], "silu", w[1], config=cfg)
                return skinny_gated_linear(x, w, "silu", config=cfg)

            row = {"shape": name, "fp8": fp8, "rows": rows, "n": n, "k": k}
            for label, fn in (("two_launches", two_launches), ("gated", gated)):
                s = graph_seconds([lambda w=w, fn=fn: fn(w) for w in weights])
                row[f"{label}_us"] = round(s * 1e6, 1)
                row[f"{label}_of_copy_bw"] = round(nbytes / s / copy_bw, 3)
            line = (
                f"{name:9s} {'fp8 ' if fp8 else 'bf16'} M={rows:2d}  two launches "
                f"{row['two_launches_us']:6.1f} us ({row['two_launches_of_copy_bw']:.0%})  "
                f"gated {row['gated_us']:6.1f} us ({row['gated_of_copy_bw']:.0%})"
            )
            if not args.no_sweep and rows == min(args.rows):  # the sweep at the fewest rows
                timed = []
                for cfg in gated_configs(fp8):
                    try:
                        calls = [lambda w=w, c=cfg: gated(w, cfg=c) for w in weights]
                        timed.append((graph_seconds(calls), cfg))
                    except Exception as error:  # a setting this GPU cannot launch
                        print(f"{name} {rows} {cfg}: {type(error).__name__}")
                if timed:  # (none when no setting launched)
                    timed.sort()
                    summary = sweep_summary(timed, row["gated_us"] / 1e6, nbytes, copy_bw)
                    row["sweep"] = {key: summary[key] for key in ("best_us", "best", "top5")}
                    line += (
                        f"  best gated {summary['best_us']:6.1f} us {tuple(summary['best'])[:5]}"
                    )
            rows_out.append(row)
            print(line, flush=True)
    result["rows"] = rows_out
    write_json(args.json, result)


if __name__ == "__main__":
    main()
