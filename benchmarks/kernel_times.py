"""Attention kernels alone, against the memory roofline and PyTorch's flash SDPA.

    python benchmarks/kernel_times.py [--json out.json]

- decode: B sequences of one query each over long paged contexts; bytes = every
  key and value read once; reported as a fraction of measured copy bandwidth.
- prefill: one causal prompt, non-paged shapes for SDPA (flash backend) and the
  same tokens through our paged kernel (contiguous block table), both bf16.
- moe: one Mixtral-8x7B-shaped expert layer (H 4096, I 14336, 8 experts, top 2)
  at several token counts: the grouped Triton kernel against the torch loop over
  experts; expert-weight bandwidth (few tokens) and TFLOP/s (many tokens).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import torch
import triton

from benchmarks.common import environment, roofline, write_json
from mii.ops.attention import AttentionBatch, TileSet, plan_tiles
from mii.ops.triton_attention import paged_attention_from_cache

HEADS, KV_HEADS, DIM, BLOCK = 32, 32, 128, 16


def paged_batch(query_lens, seq_lens, device, num_blocks):
    tables, start = [], 0
    for n in seq_lens:
        count = (n + BLOCK - 1) // BLOCK
        tables.append(list(range(start, start + count)))
        start += count
    assert start <= num_blocks
    width = max(map(len, tables))
    cu = [0]
    for q in query_lens:
        cu.append(cu[-1] + q)

    def t(x, dtype=torch.int32):
        return torch.tensor(x, dtype=dtype, device=device)

    return AttentionBatch(
        slot_mapping=t([0] * cu[-1], torch.int64),
        block_tables=t([r + [0] * (width - len(r)) for r in tables]),
        cu_seqlens_q=t(cu),
        seq_lens=t(seq_lens),
        query_lens_host=list(query_lens),
        seq_lens_host=list(seq_lens),
        tiles=[TileSet(size, t(seqs), t(starts)) for size, seqs, starts in plan_tiles(query_lens)],
    )


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def bench_graph(fn) -> float:
    """``fn`` replayed from a CUDA graph, as the engine runs decode: a decode kernel
    of a few microseconds would otherwise measure the host's launch overhead."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {"benchmark": "kernels", **environment(), "roofline": roofline(device)}
    copy_bw = result["roofline"]["copy_tb_per_s"] * 1e12
    total_blocks = 40_000  # 40k x 16 tokens = 640k tokens of KV, about 10 GiB each for k and v
    k_cache = torch.randn(total_blocks, BLOCK, KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)

    decode = []
    for batch_size, context in [
        (1, 4096),
        (1, 32768),
        (8, 4096),
        (32, 4096),
        (64, 2048),
        (16, 32768),
    ]:
        batch = paged_batch([1] * batch_size, [context] * batch_size, device, total_blocks)
        q = torch.randn(batch_size, HEADS, DIM, device=device, dtype=torch.bfloat16)
        seconds = bench_graph(
            lambda q=q, batch=batch: paged_attention_from_cache(
                q, k_cache, v_cache, batch, DIM**-0.5
            )
        )
        moved = 2 * batch_size * context * KV_HEADS * DIM * 2
        decode.append(
            {
                "batch": batch_size,
                "context": context,
                "us": round(seconds * 1e6, 1),
                "tb_per_s": round(moved / seconds / 1e12, 3),
                "fraction_of_copy": round(moved / seconds / copy_bw, 3),
            }
        )
    result["decode"] = decode

    prefill = []
    for length in (1024, 2048, 4096):
        q = torch.randn(1, HEADS, length, DIM, device=device, dtype=torch.bfloat16)
        k = torch.randn_like(q)
        v = torch.randn_like(q)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q=q, k=k, v=v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        sdpa_s = bench(flash)
        batch = paged_batch([length], [length], device, total_blocks)
        q_ragged = q[0].transpose(0, 1).contiguous()  # [T, H, D]
        ours_s = bench(
            lambda q=q_ragged, batch=batch: paged_attention_from_cache(
                q, k_cache, v_cache, batch, DIM**-0.5
            )
        )
        flops = 4 * length * length * HEADS * DIM / 2  # causal: half the square
        prefill.append(
            {
                "length": length,
                "sdpa_flash_us": round(sdpa_s * 1e6, 1),
                "mii_us": round(ours_s * 1e6, 1),
                "mii_over_sdpa": round(ours_s / sdpa_s, 2),
                "mii_tflops": round(flops / ours_s / 1e12, 1),
            }
        )
    result["prefill"] = prefill
    result["moe"] = moe_layer(device, copy_bw, result["roofline"]["matmul_bf16_tflops"] * 1e12)
    write_json(args.json, result)


def moe_layer(device: torch.device, copy_bw: float, matmul_flops: float) -> list[dict]:
    from mii.models.moe import SparseMoE
    from mii.ops.triton_moe import TileConfig, default_tiles, moe_grouped_mlp

    hidden, inter, experts, top_k = 4096, 14336, 8, 2
    with torch.device(device):
        moe = SparseMoE(hidden, inter, experts, top_k).to(torch.bfloat16)
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0, 0.02)
    # Candidate tiles per size (the first is the default): the sweep picks defaults.
    candidates = [
        TileConfig(16, 64, 128),
        TileConfig(16, 128, 128),
        TileConfig(16, 64, 256, num_warps=4, num_stages=4),
        TileConfig(32, 64, 128),
        TileConfig(64, 128, 64),
        TileConfig(64, 128, 64, num_warps=8, num_stages=4),
        TileConfig(128, 128, 64, num_warps=8),
        TileConfig(128, 256, 64, num_warps=8),
    ]
    rows = []
    for tokens in (1, 16, 128, 1024, 4096):
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            weights, chosen = moe.route(x)
            args = (x, weights, chosen)
            loop_s = bench(lambda args=args: moe.forward_torch(*args))
            default = default_tiles(tokens * top_k)
            sweep = {}
            for tiles in [default, *candidates]:
                sweep[tiles] = bench(
                    lambda tiles=tiles, args=args: moe_grouped_mlp(
                        args[0], moe.w13, moe.w2, *args[1:], moe.act, tiles
                    )
                )
        grouped_s = sweep[default]
        best = min(sweep, key=sweep.get)
        used = chosen.unique().numel()
        weight_bytes = used * 3 * hidden * inter * 2
        flops = 2 * tokens * top_k * 3 * hidden * inter
        rows.append(
            {
                "tokens": tokens,
                "grouped_us": round(grouped_s * 1e6, 1),
                "torch_loop_us": round(loop_s * 1e6, 1),
                "loop_over_grouped": round(loop_s / grouped_s, 2),
                "grouped_weight_fraction_of_copy": round(weight_bytes / grouped_s / copy_bw, 3),
                "grouped_tflops": round(flops / grouped_s / 1e12, 1),
                "grouped_fraction_of_matmul": round(flops / grouped_s / matmul_flops, 3),
                "best_tiles": list(best),
                "best_us": round(sweep[best] * 1e6, 1),
            }
        )
    return rows


if __name__ == "__main__":
    main()
