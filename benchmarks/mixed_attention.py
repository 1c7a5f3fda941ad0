"""Attention of whole mixed passes (prompt chunks + decodes), launch by launch,
against their floors (a diagnostic for the serving and W1 mixed passes, whose
profiles spent 10-31 ms per 4,096-token pass in attention).

    python benchmarks/mixed_attention.py [--json out.json]

Each case is one layer's attention of a pass the engine runs (paged bf16 cache,
16-token blocks, heads of 128): its decode tiles alone, its prompt tiles alone,
and both (the engine's two launches: one after the other, and with the decode
tiles on a second stream, MII_ATTENTION_OVERLAP), from CUDA graphs; the prompt
tiles also at the other launch settings of ``PROMPT_VARIANTS``. Floors: the decode
tiles' KV bytes at the measured copy bandwidth; the prompt tiles' causal FLOPs
at flash SDPA's rate on the same prompts (``sdpa_us``: one flash SDPA call per
whole prompt, all in one CUDA graph; chunks with cached keys have no SDPA peer).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import random

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import environment, roofline, write_json
from benchmarks.kernel_times import BLOCK, DIM, HEADS, bench_graph, paged_batch
from mii.ops import triton_attention
from mii.ops.triton_attention import paged_attention_from_cache


def w1_prompts(seed: int, budget: int = 4096) -> list[int]:
    """W1's prompt lengths (U[128, 1024]) filling one token budget, the last cut."""
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < budget:
        lengths.append(min(rng.randint(128, 1024), budget - sum(lengths)))
    return lengths


# name: (KV heads, [(queries, keys) of each prompt chunk], decodes, decode context)
CASES = {
    # W1 mid-run: ~7 whole prompts and ~140 decoding sequences
    "w1-llama3": (8, [(n, n) for n in w1_prompts(0)], 140, 650),
    "w1-llama2": (32, [(n, n) for n in w1_prompts(0)], 140, 650),
    "w1-llama3-prompts": (8, [(n, n) for n in w1_prompts(0)], 0, 0),
    "w1-llama2-prompts": (32, [(n, n) for n in w1_prompts(0)], 0, 0),
    # FastGen serving: one prompt's tail and the next one's head, 60 decodes at ~2,600
    "serving-llama2": (32, [(1500, 2600), (2536, 2536)], 60, 2600),
    "serving-llama2-prompts": (32, [(1500, 2600), (2536, 2536)], 0, 0),
}

# Prompt-tile launch settings timed beside PROMPT_LAUNCH (``prompt_<name>_us``): the
# default 4-warp 128-query program holds 255 registers a thread and spills; 8 warps
# halve each thread's share of the tile.
PROMPT_VARIANTS = {
    "w8": {"block_n": 64, "num_warps": 8, "num_stages": 3},
    "w8_s2": {"block_n": 64, "num_warps": 8, "num_stages": 2},
    "n32": {"block_n": 32, "num_warps": 4, "num_stages": 3},
}


def causal_flops(chunks: list[tuple[int, int]]) -> float:
    """QKᵀ and PV over each chunk's visible (query, key) pairs (chunk ends its keys)."""
    visible = sum(q * (k - q) + q * (q + 1) // 2 for q, k in chunks)
    return 2 * 2 * visible * HEADS * DIM


def sdpa_us(chunks: list[tuple[int, int]], kv_heads: int, device) -> float | None:
    """Flash SDPA on each whole prompt (grouped-query: K/V broadcast), one graph."""
    if any(q != k for q, k in chunks):
        return None
    tensors = []
    for n, _ in chunks:
        q = torch.randn(1, HEADS, n, DIM, device=device, dtype=torch.bfloat16)
        kv = torch.randn(1, kv_heads, n, DIM, device=device, dtype=torch.bfloat16)
        tensors.append((q, kv))

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for q, kv in tensors:
                torch.nn.functional.scaled_dot_product_attention(
                    q, kv, kv, is_causal=True, enable_gqa=kv_heads != HEADS
                )

    try:
        return bench_graph(run) * 1e6
    except RuntimeError as err:  # a torch whose flash path lacks grouped-query K/V
        print("flash SDPA failed:", str(err)[:120])
        return None


def time_batch(query_lens, seq_lens, kv_heads, device, k_cache, v_cache) -> float:
    batch = paged_batch(query_lens, seq_lens, device, k_cache.shape[0])
    q = torch.randn(sum(query_lens), HEADS, DIM, device=device, dtype=torch.bfloat16)
    return bench_graph(lambda: paged_attention_from_cache(q, k_cache, v_cache, batch, DIM**-0.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {"benchmark": "mixed_attention", **environment(), "roofline": roofline(device)}
    copy_bw = result["roofline"]["copy_tb_per_s"] * 1e12
    rows = []
    for name, (kv_heads, chunks, decodes, context) in CASES.items():
        seq_lens = [k for _, k in chunks] + [context] * decodes
        blocks = sum(-(-n // BLOCK) for n in seq_lens)
        k_cache = torch.randn(blocks, BLOCK, kv_heads, DIM, device=device, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        prompt_q, prompt_k = [q for q, _ in chunks], [k for _, k in chunks]
        row: dict = {"case": name, "prompts": chunks, "decodes": decodes, "context": context}
        row["prompt_us"] = round(
            time_batch(prompt_q, prompt_k, kv_heads, device, k_cache, v_cache) * 1e6, 1
        )
        flops = causal_flops(chunks)
        row["prompt_tflops"] = round(flops / row["prompt_us"] / 1e6)
        for variant, launch in PROMPT_VARIANTS.items():  # other PROMPT_LAUNCH settings
            default, triton_attention.PROMPT_LAUNCH = triton_attention.PROMPT_LAUNCH, launch
            seconds = time_batch(prompt_q, prompt_k, kv_heads, device, k_cache, v_cache)
            triton_attention.PROMPT_LAUNCH = default
            row[f"prompt_{variant}_us"] = round(seconds * 1e6, 1)
        sdpa = sdpa_us(chunks, kv_heads, device)
        if sdpa is not None:
            row["sdpa_us"] = round(sdpa, 1)
            row["prompt_over_sdpa"] = round(row["prompt_us"] / sdpa, 2)
        if decodes:
            row["decode_us"] = round(
                time_batch([1] * decodes, [context] * decodes, kv_heads, device, k_cache, v_cache)
                * 1e6,
                1,
            )
            moved = 2 * decodes * context * kv_heads * DIM * 2
            row["decode_of_copy_bw"] = round(moved / (row["decode_us"] / 1e6) / copy_bw, 3)
            if kv_heads < HEADS:  # MII_GQA_DECODE_QUERIES=pack: 16-row packed programs
                os.environ["MII_GQA_DECODE_QUERIES"] = "pack"
                seconds = time_batch(
                    [1] * decodes, [context] * decodes, kv_heads, device, k_cache, v_cache
                )
                os.environ.pop("MII_GQA_DECODE_QUERIES")
                row["decode_fill_us"] = round(seconds * 1e6, 1)
            for overlap in ("off", "streams", "priority"):  # MII_ATTENTION_OVERLAP
                os.environ["MII_ATTENTION_OVERLAP"] = overlap
                seconds = time_batch(
                    prompt_q + [1] * decodes, seq_lens, kv_heads, device, k_cache, v_cache
                )
                row["both_us" if overlap == "off" else f"both_{overlap}_us"] = round(
                    seconds * 1e6, 1
                )
            os.environ.pop("MII_ATTENTION_OVERLAP")
        row["x32_layers_ms"] = round(row.get("both_us", row["prompt_us"]) * 32 / 1e3, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["rows"] = rows
    write_json(args.json, result)


if __name__ == "__main__":
    main()
