"""Launch settings of the prompt-tile attention kernel (a diagnostic: its best row
sets ``PROMPT_LAUNCH`` and ``attention.LARGE_TILE``), in TFLOP/s of causal
attention, with flash SDPA on the same work where SDPA can express it.

    python benchmarks/prefill_sweep.py [--json out.json]

Cases (32 query heads of 128; bf16 paged cache, 16-token blocks):
- ``prompt-1024``, ``prompt-4096``: one causal prompt, whole (SDPA: ``is_causal``);
- ``chunk-4096@32k``: the last 4,096-token chunk of a 32,768-token prompt (chunked
  prefill of a long prompt: 28,672 cached keys, then the causal diagonal), with 8
  KV heads (Llama-3's grouped-query layout). SDPA gets the same keys with an
  explicit mask (its flash path cannot offset the diagonal), so its time is an
  upper bound, not a peer.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import itertools
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import environment, write_json
from benchmarks.kernel_times import BLOCK, DIM, HEADS, bench, paged_batch
from mii.ops import attention, triton_attention
from mii.ops.triton_attention import paged_attention_from_cache

CASES = {
    # name: (queries, keys, KV heads)
    "prompt-1024": (1024, 1024, 32),
    "prompt-4096": (4096, 4096, 32),
    "chunk-4096@32k": (4096, 32768, 8),
}


def causal_flops(queries: int, keys: int) -> float:
    """QKᵀ and PV over the visible (query, key) pairs of a chunk ending the sequence."""
    context = keys - queries
    visible = queries * context + queries * (queries + 1) // 2
    return 2 * 2 * visible * HEADS * DIM


def sdpa_seconds(queries: int, keys: int, kv_heads: int, device) -> float:
    q = torch.randn(1, HEADS, queries, DIM, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, HEADS, keys, DIM, device=device, dtype=torch.bfloat16)
    if queries == keys:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return bench(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True)
            )
    rows = torch.arange(queries, device=device)[:, None] + (keys - queries)
    mask = torch.arange(keys, device=device)[None, :] <= rows
    return bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv, mask))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows, baselines = [], {}
    for name, (queries, keys, kv_heads) in CASES.items():
        blocks = keys // BLOCK
        k_cache = torch.randn(blocks, BLOCK, kv_heads, DIM, device=device, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(queries, HEADS, DIM, device=device, dtype=torch.bfloat16)
        flops = causal_flops(queries, keys)
        sdpa = sdpa_seconds(queries, keys, kv_heads, device)
        baselines[name] = {
            "sdpa_us": round(sdpa * 1e6, 1),
            "sdpa_tflops": round(flops / sdpa / 1e12),
        }
        print(name, json.dumps(baselines[name]), flush=True)
        for tile, block_n, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
            attention.LARGE_TILE = tile
            batch = paged_batch([queries], [keys], device, blocks)
            triton_attention.PROMPT_LAUNCH.update(
                block_n=block_n, num_warps=warps, num_stages=stages
            )
            try:
                ours = bench(
                    lambda b=batch, q=q, k=k_cache, v=v_cache: paged_attention_from_cache(
                        q, k, v, b, DIM**-0.5
                    )
                )
            except Exception as err:  # e.g. out of shared memory
                print(name, tile, block_n, warps, stages, "failed:", str(err)[:80])
                continue
            rows.append(
                {
                    "case": name,
                    "tile": tile,
                    "block_n": block_n,
                    "warps": warps,
                    "stages": stages,
                    "us": round(ours * 1e6, 1),
                    "tflops": round(flops / ours / 1e12),
                    "over_sdpa": round(ours / sdpa, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    totals: dict[tuple, float] = {}
    for row in rows:
        key = (row["tile"], row["block_n"], row["warps"], row["stages"])
        totals[key] = totals.get(key, 0.0) + row["us"] / baselines[row["case"]]["sdpa_us"]
    ranked = sorted(totals.items(), key=lambda kv: kv[1])
    print("best (tile, block_n, warps, stages) by summed time / SDPA:", ranked[:6])
    write_json(
        args.json, {**environment(), "baselines": baselines, "rows": rows, "ranked": ranked[:10]}
    )


if __name__ == "__main__":
    main()
