"""Launch settings of the prompt-tile attention kernel, timed on causal prefill
against flash SDPA (a diagnostic: its best row sets ``PROMPT_LAUNCH``).

    python benchmarks/prefill_sweep.py
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import environment
from benchmarks.kernels import BLOCK, DIM, HEADS, KV_HEADS, bench, paged_batch
from mii.ops import triton_attention
from mii.ops.triton_attention import paged_attention_from_cache


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    device = torch.device("cuda")
    blocks = 2048
    k_cache = torch.randn(blocks, BLOCK, KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    rows = []
    for length in (1024, 4096):
        q = torch.randn(1, HEADS, length, DIM, device=device, dtype=torch.bfloat16)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = bench(
                lambda q=q: torch.nn.functional.scaled_dot_product_attention(
                    q, q, q, is_causal=True
                )
            )
        batch = paged_batch([length], [length], device, blocks)
        q_ragged = q[0].transpose(0, 1).contiguous()
        for block_n, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4)):
            triton_attention.PROMPT_LAUNCH.update(
                block_n=block_n, num_warps=warps, num_stages=stages
            )
            try:
                ours = bench(
                    lambda q=q_ragged, b=batch: paged_attention_from_cache(
                        q, k_cache, v_cache, b, DIM**-0.5
                    )
                )
            except Exception as err:  # e.g. out of shared memory
                print(length, block_n, warps, stages, "failed:", str(err)[:80])
                continue
            rows.append(
                {
                    "length": length,
                    "block_n": block_n,
                    "warps": warps,
                    "stages": stages,
                    "us": round(ours * 1e6, 1),
                    "over_sdpa": round(ours / sdpa, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    best = {}
    for row in rows:
        key = (row["block_n"], row["warps"], row["stages"])
        best[key] = best.get(key, 0) + row["over_sdpa"]
    print(
        json.dumps(environment()),
        "best (sum of ratios):",
        sorted(best.items(), key=lambda kv: kv[1])[:5],
    )


if __name__ == "__main__":
    main()
