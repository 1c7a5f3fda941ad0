"""Launch settings of the decode-tile attention kernel over bf16 and fp8 caches,
timed from CUDA graphs (a diagnostic: its best rows set ``DECODE_LAUNCH``).

    python benchmarks/decode_sweep.py [--json out.json]
    python benchmarks/decode_sweep.py --long-context   # batch 1, 1k-128k keys, split counts
    python benchmarks/decode_sweep.py --batch1-step   # in-kernel merge / L2 prefetch, in a step
    python benchmarks/decode_sweep.py --one-query   # fp8 one-head decode: products vs CUDA cores
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import functools
import itertools
import os

import torch

from benchmarks.common import environment, roofline, sweep_summary, write_json
from benchmarks.kernel_times import BLOCK, DIM, HEADS, KV_HEADS, bench_graph, paged_batch
from mii.ops import triton_attention
from mii.ops.attention import FP8_KV_DTYPE
from mii.ops.triton_attention import paged_attention_from_cache
from mii.ops.triton_limits import multiprocessors

GQA_DEFAULT_PACK = triton_attention.GQA_DECODE_PACK

# (sequences, context): W1's decode passes (256 x ~650), a long-context batch.
SHAPES = [(256, 640), (32, 4096), (4, 16384)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--gqa-only", action="store_true", help="only the grouped-query rows")
    parser.add_argument(
        "--long-context",
        action="store_true",
        help="only batch 1 at 1k-128k keys, by split count (Llama-3-8B and Llama-2-7B layouts)",
    )
    parser.add_argument(
        "--batch1-launch",
        action="store_true",
        help="only batch 1's launch settings (keys per step, warps, stages), bf16 cache",
    )
    parser.add_argument(
        "--mixed-lengths",
        action="store_true",
        help="only W1's decode pass (233 sequences) at one length vs W1's spread of lengths "
        "(same keys in all), bf16 and fp8 caches, Llama-2-7B layout, default launches",
    )
    parser.add_argument(
        "--one-query",
        action="store_true",
        help="only one-head decode programs on an fp8 cache: MII_DECODE_ONE_QUERY=dot vs "
        "cores at W1's batch and at long contexts, and the cores path's launch settings",
    )
    parser.add_argument(
        "--one-query-counts",
        action="store_true",
        help="only the fp8-cache CUDA-core decode programs unsplit, narrow vs wide launch, "
        "by sequence count (where MII_ONE_QUERY_UNSPLIT_LAUNCH=narrow starts to win)",
    )
    parser.add_argument(
        "--batch1-step",
        action="store_true",
        help="only batch 1's attention inside a decode step (qkv, rotary, attention, o), "
        "merge launch vs in-kernel merge, with and without the keys' L2 prefetch",
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {"benchmark": "decode_sweep", **environment(), "roofline": roofline(device)}
    copy_bw = result["roofline"]["copy_tb_per_s"] * 1e12
    total_blocks = 40_000
    # One diagnostic alone when asked: its result's key, and what runs it.
    alone = {
        "long_context": ("long_context_splits", lambda: long_context_splits(copy_bw, device)),
        "batch1_launch": ("batch1_launch", lambda: batch1_launch(copy_bw, device)),
        "mixed_lengths": ("mixed_lengths", lambda: mixed_lengths(copy_bw, device)),
        "one_query": ("one_query", lambda: one_query(copy_bw, device)),
        "one_query_counts": ("one_query_counts", lambda: one_query_counts(copy_bw, device)),
        "batch1_step": ("batch1_step", lambda: batch1_step(device)),
        "gqa_only": ("gqa_program_order", lambda: gqa_order(copy_bw, total_blocks, device)),
    }
    for flag, (key, run) in alone.items():
        if getattr(args, flag):
            result[key] = run()
            write_json(args.json, result)
            return
    bf16_k = torch.randn(total_blocks, BLOCK, KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
    bf16_v = torch.randn_like(bf16_k)
    caches = {"bf16": (bf16_k, bf16_v), "fp8": (bf16_k.to(FP8_KV_DTYPE), bf16_v.to(FP8_KV_DTYPE))}
    rows = []
    for (name, (k_cache, v_cache)), (seqs, context) in itertools.product(caches.items(), SHAPES):
        batch = paged_batch([1] * seqs, [context] * seqs, device, total_blocks)
        q = torch.randn(seqs, HEADS, DIM, device=device, dtype=torch.bfloat16)
        moved = 2 * seqs * context * KV_HEADS * DIM * k_cache.element_size()
        split = seqs * KV_HEADS < 2 * multiprocessors(device)  # the launch split-KV takes
        if name == "fp8":
            kind = "DECODE_LAUNCH_FP8" if split else "DECODE_LAUNCH_FP8_MHA"
        else:
            kind = "DECODE_LAUNCH_SPLIT" if split else "DECODE_LAUNCH"
        launch = getattr(triton_attention, kind)
        timed, default = time_launches(
            launch, (32, 64, 128, 256), q, k_cache, v_cache, batch, f"{name} {seqs}x{context}"
        )
        row = {"cache": name, "seqs": seqs, "context": context}
        row |= sweep_summary(timed, default, moved, copy_bw)
        rows.append(row)
        print(
            f"{name:4s} {seqs:3d} x {context:5d}: default {row['default_us']:8.1f} us "
            f"({row['default_of_copy_bw']:.0%})  best {row['best_us']:8.1f} us "
            f"({row['best_of_copy_bw']:.0%}) {row['best']}",
            flush=True,
        )
    result["rows"] = rows
    result["batch1_split_min_keys"] = batch1_splits(caches, copy_bw, total_blocks, device)
    result["gqa_program_order"] = gqa_order(copy_bw, total_blocks, device)
    write_json(args.json, result)


# Grouped-query decode settings: (query heads per program, launch settings that
# differ from the cache's default decode launch).
GQA_VARIANTS = {
    "tile_major": (1, {}),
    "head_major": (1, {}),
    "pack2": (2, {}),
    "pack4": (4, {}),
    "pack4_w8": (4, {"num_warps": 8}),
    "pack4_n32": (4, {"block_n": 32}),
    "pack4_n64": (4, {"block_n": 64}),
    "pack4_n128": (4, {"block_n": 128}),
    "pack4_s2": (4, {"num_stages": 2}),
    "pack4_s3": (4, {"num_stages": 3}),
    "pack4_s4": (4, {"num_stages": 4}),
    "pack4_n64_s2": (4, {"block_n": 64, "num_stages": 2}),
    # MII_GQA_DECODE_QUERIES=pack: 16 rows a pass (a decode's 4 heads), not 64; settings
    # over DECODE_LAUNCH_GQA_FILL (bf16) / DECODE_LAUNCH_FP8_GQA_FILL (fp8)
    "pack4_fill": (4, {}),
    "pack4_fill_n64": (4, {"block_n": 64}),
    "pack4_fill_n128": (4, {"block_n": 128}),
    "pack4_fill_s2": (4, {"num_stages": 2}),
    "pack4_fill_s3": (4, {"num_stages": 3}),
    "pack4_fill_w2": (4, {"num_warps": 2}),
    "pack4_fill_w4": (4, {"num_warps": 4}),
}


def gqa_order(copy_bw: float, total_blocks: int, device, kv_heads: int = 8) -> list[dict]:
    """Grouped-query decode (32 query heads on 8 KV heads, Llama-3-8B's layout):
    one query head per program, tile-major or head-major (the heads sharing a KV
    head launched together), against programs that take 2 or 4 of a KV head's
    query heads as rows (``GQA_DECODE_PACK``): the bytes each reads, as time."""
    k_cache = torch.randn(total_blocks, BLOCK, kv_heads, DIM, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    rows = []
    for name, (kc, vc) in {
        "bf16": (k_cache, v_cache),
        "fp8": (k_cache.to(FP8_KV_DTYPE), v_cache.to(FP8_KV_DTYPE)),
    }.items():
        # the launches the packed programs take, with whole tiles or 16 rows a pass
        kind = "DECODE_LAUNCH_FP8" if name == "fp8" else "DECODE_LAUNCH_GQA"
        fill_kind = "DECODE_LAUNCH_FP8_GQA_FILL" if name == "fp8" else "DECODE_LAUNCH_GQA_FILL"
        for seqs, context in SHAPES:
            batch = paged_batch([1] * seqs, [context] * seqs, device, total_blocks)
            q = torch.randn(seqs, HEADS, DIM, device=device, dtype=torch.bfloat16)
            moved = 2 * seqs * context * kv_heads * DIM * kc.element_size()
            row = {"cache": name, "seqs": seqs, "context": context, "kv_heads": kv_heads}
            for variant, (pack, settings) in GQA_VARIANTS.items():
                launch = getattr(triton_attention, fill_kind if "_fill" in variant else kind)
                defaults = launch.copy()
                triton_attention.HEAD_MAJOR_DECODE = variant != "tile_major"
                triton_attention.GQA_DECODE_PACK = pack
                launch.update(settings)
                os.environ["MII_GQA_DECODE_QUERIES"] = "pack" if "_fill" in variant else "tile"
                try:
                    seconds = bench_graph(
                        lambda q=q, b=batch, k=kc, v=vc: paged_attention_from_cache(
                            q, k, v, b, DIM**-0.5
                        )
                    )
                finally:
                    triton_attention.HEAD_MAJOR_DECODE = True
                    triton_attention.GQA_DECODE_PACK = GQA_DEFAULT_PACK
                    launch.update(defaults)
                    os.environ.pop("MII_GQA_DECODE_QUERIES")
                row[f"{variant}_us"] = round(seconds * 1e6, 1)
                row[f"{variant}_of_copy_bw"] = round(moved / seconds / copy_bw, 3)
            rows.append(row)
            print(f"GQA {name} {seqs} x {context}: {row}", flush=True)
    return rows


def long_context_splits(copy_bw: float, device) -> list[dict]:
    """Batch 1 over 1k-128k keys: Llama-3-8B's layout (32 query heads on 8 KV heads,
    4 packed per program) and Llama-2-7B's (32 KV heads), bf16 and fp8 caches, at
    the default split count and at 1-128 explicit slices: the bytes read, as time."""
    contexts = (1024, 4096, 8192, 32768, 131072)
    rows = []
    for kv_heads in (8, 32):
        total_blocks = (max(contexts) if kv_heads == 8 else 32768) // BLOCK + 64
        k_cache = torch.randn(
            total_blocks, BLOCK, kv_heads, DIM, device=device, dtype=torch.bfloat16
        )
        v_cache = torch.randn_like(k_cache)
        for name, (kc, vc) in {
            "bf16": (k_cache, v_cache),
            "fp8": (k_cache.to(FP8_KV_DTYPE), v_cache.to(FP8_KV_DTYPE)),
        }.items():
            for context in contexts:
                if context > (total_blocks - 64) * BLOCK:
                    continue
                batch = paged_batch([1], [context], device, total_blocks)
                q = torch.randn(1, HEADS, DIM, device=device, dtype=torch.bfloat16)
                moved = 2 * context * kv_heads * DIM * kc.element_size()
                row = {"kv_heads": kv_heads, "cache": name, "context": context}
                for splits in (None, 1, 8, 16, 32, 64, 128):
                    seconds = bench_graph(
                        lambda q=q, b=batch, k=kc, v=vc, s=splits: paged_attention_from_cache(
                            q, k, v, b, DIM**-0.5, splits=s
                        )
                    )
                    key = "default" if splits is None else f"s{splits}"
                    row[f"{key}_us"] = round(seconds * 1e6, 1)
                    row[f"{key}_of_copy_bw"] = round(moved / seconds / copy_bw, 3)
                rows.append(row)
                print(f"long context {row}", flush=True)
        del k_cache, v_cache, kc, vc
    return rows


def mixed_lengths(copy_bw: float, device) -> list[dict]:
    """W1's decode passes hold ~233 sequences of U[128,1024] prompt tokens plus up to
    128 generated: does the spread of lengths (some programs twice as long as others)
    cost the one-head launch its rate, against the same keys at one length?"""
    gen = torch.Generator().manual_seed(0)
    seqs = 233
    spread = (torch.randint(128, 1025, (seqs,), generator=gen) + 80).tolist()
    uniform = [sum(spread) // seqs] * seqs
    total_blocks = sum((n + BLOCK - 1) // BLOCK for n in spread) + 64
    k_bf16 = torch.randn(total_blocks, BLOCK, KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
    v_bf16 = torch.randn_like(k_bf16)
    caches = {
        "bf16": (k_bf16, v_bf16),
        "fp8": (k_bf16.to(FP8_KV_DTYPE), v_bf16.to(FP8_KV_DTYPE)),
    }
    q = torch.randn(seqs, HEADS, DIM, device=device, dtype=torch.bfloat16)
    rows = []
    for (name, (k_cache, v_cache)), (shape, lengths) in itertools.product(
        caches.items(), (("uniform", uniform), ("spread", spread))
    ):
        batch = paged_batch([1] * seqs, lengths, device, total_blocks)
        seconds = bench_graph(
            lambda k=k_cache, v=v_cache, b=batch: paged_attention_from_cache(q, k, v, b, DIM**-0.5)
        )
        moved = 2 * sum(lengths) * KV_HEADS * DIM * k_cache.element_size()
        row = {"cache": name, "lengths": shape, "us": round(seconds * 1e6, 1)}
        row["of_copy_bw"] = round(moved / seconds / copy_bw, 3)
        rows.append(row)
        print(f"{name:4s} {shape:7s}: {row['us']:8.1f} us ({row['of_copy_bw']:.0%})", flush=True)
    return rows


# (sequences, keys of each): W1's decode passes (one length; its spread costs
# nothing, mixed_lengths), serving's long prompts, split-KV at few sequences.
ONE_QUERY_SHAPES = [(233, 760), (64, 2600), (4, 16384), (1, 32768)]


def one_query(copy_bw: float, device) -> list[dict]:
    """One-head decode programs (Llama-2-7B's 32 heads) on an fp8 cache: the 16-row
    products ('dot', DECODE_LAUNCH_FP8*) against the CUDA-core path ('cores') at its
    production launch (DECODE_LAUNCH_ONE_QUERY split, ..._UNSPLIT unsplit) and its launch
    sweep (both launches set alike); bf16's default beside. Every setting's time is
    kept in the JSON ("all")."""
    rows = []
    launches = (
        triton_attention.DECODE_LAUNCH_ONE_QUERY,
        triton_attention.DECODE_LAUNCH_ONE_QUERY_UNSPLIT,
    )
    defaults = [launch.copy() for launch in launches]
    saved = os.environ.get("MII_DECODE_ONE_QUERY")
    try:
        for seqs, context in ONE_QUERY_SHAPES:
            blocks = seqs * ((context + BLOCK - 1) // BLOCK) + 8
            k = torch.randn(blocks, BLOCK, KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            fp8 = (k.to(FP8_KV_DTYPE), v.to(FP8_KV_DTYPE))
            batch = paged_batch([1] * seqs, [context] * seqs, device, blocks)
            q = torch.randn(seqs, HEADS, DIM, device=device, dtype=torch.bfloat16)
            moved = 2 * seqs * context * KV_HEADS * DIM  # fp8 bytes (bf16: twice)

            def timed(k_cache, v_cache, choice, q=q, batch=batch):
                os.environ["MII_DECODE_ONE_QUERY"] = choice
                return bench_graph(
                    lambda: paged_attention_from_cache(q, k_cache, v_cache, batch, DIM**-0.5)
                )

            row = {"seqs": seqs, "context": context}
            row["bf16_us"] = round(timed(k, v, "dot") * 1e6, 1)
            row["dot_us"] = round(timed(*fp8, "dot") * 1e6, 1)
            production = timed(*fp8, "cores")  # the shape's own launch (split or not)
            sweep = []
            settings = itertools.product((16, 32, 64), (1, 2, 4, 8), (1, 2, 3))
            for block_n, warps, stages in settings:
                for launch in launches:
                    launch.update(block_n=block_n, num_warps=warps, num_stages=stages)
                try:
                    sweep.append((timed(*fp8, "cores"), (block_n, warps, stages)))
                except Exception as error:  # a setting this GPU cannot launch
                    print(f"cores {block_n},{warps},{stages}: {type(error).__name__}")
            for launch, default in zip(launches, defaults, strict=True):
                launch.update(default)
            sweep.sort()
            row |= sweep_summary(sweep, production, moved, copy_bw)
            row["all"] = {"/".join(map(str, c)): round(t * 1e6, 1) for t, c in sweep}
            row["dot_of_copy_bw"] = round(moved / (row["dot_us"] * 1e-6) / copy_bw, 3)
            row["bf16_of_copy_bw"] = round(2 * moved / (row["bf16_us"] * 1e-6) / copy_bw, 3)
            rows.append(row)
            print(
                f"{seqs:3d} x {context:5d}: bf16 {row['bf16_us']:7.1f} us "
                f"({row['bf16_of_copy_bw']:.0%})  fp8 dot {row['dot_us']:7.1f} "
                f"({row['dot_of_copy_bw']:.0%})  cores {row['default_us']:7.1f} "
                f"({row['default_of_copy_bw']:.0%})  best {row['best_us']:7.1f} "
                f"({row['best_of_copy_bw']:.0%}) {row['best']}  top5 {row['top5']}",
                flush=True,
            )
            del k, v, fp8
    finally:
        for launch, default in zip(launches, defaults, strict=True):
            launch.update(default)
        if saved is None:
            os.environ.pop("MII_DECODE_ONE_QUERY", None)
        else:
            os.environ["MII_DECODE_ONE_QUERY"] = saved
    return rows


# Sequence counts from split-KV's threshold (2 programs per multiprocessor) to W1's
# decode batch: where the narrow unsplit launch starts to win (1,024 keys each).
ONE_QUERY_COUNTS = (9, 12, 16, 24, 32, 40, 48, 64, 96, 128, 192, 233)


def one_query_counts(copy_bw: float, device) -> list[dict]:
    """One-head CUDA-core decode programs on an fp8 cache (Llama-2-7B's 32 heads),
    unsplit, narrow launch (DECODE_LAUNCH_ONE_QUERY_UNSPLIT) vs wide (the split-KV
    launch) by sequence count, the narrow threshold lowered to take every count."""
    rows = []
    saved = {n: os.environ.get(n) for n in ("MII_DECODE_ONE_QUERY", "MII_ONE_QUERY_UNSPLIT_LAUNCH")}
    threshold = triton_attention.ONE_QUERY_NARROW_MIN_PER_SM
    triton_attention.ONE_QUERY_NARROW_MIN_PER_SM = 0
    os.environ["MII_DECODE_ONE_QUERY"] = "cores"
    context = 1024
    try:
        for seqs in ONE_QUERY_COUNTS:
            blocks = seqs * context // BLOCK + 8
            k = torch.randn(blocks, BLOCK, KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
            fp8 = (k.to(FP8_KV_DTYPE), torch.randn_like(k).to(FP8_KV_DTYPE))
            batch = paged_batch([1] * seqs, [context] * seqs, device, blocks)
            q = torch.randn(seqs, HEADS, DIM, device=device, dtype=torch.bfloat16)
            moved = 2 * seqs * context * KV_HEADS * DIM
            row = {"seqs": seqs, "context": context}
            for choice in ("narrow", "wide"):
                os.environ["MII_ONE_QUERY_UNSPLIT_LAUNCH"] = choice
                seconds = bench_graph(
                    lambda q=q, batch=batch, kv=fp8: paged_attention_from_cache(
                        q, *kv, batch, DIM**-0.5, splits=1
                    )
                )
                row[f"{choice}_us"] = round(seconds * 1e6, 1)
                row[f"{choice}_of_copy_bw"] = round(moved / seconds / copy_bw, 3)
            rows.append(row)
            per_sm = seqs * HEADS / multiprocessors(device)
            print(
                f"{seqs:3d} x {context} ({per_sm:4.1f} programs/SM): narrow "
                f"{row['narrow_us']:7.1f} us ({row['narrow_of_copy_bw']:.0%})  wide "
                f"{row['wide_us']:7.1f} ({row['wide_of_copy_bw']:.0%})",
                flush=True,
            )
            del k, fp8
    finally:
        triton_attention.ONE_QUERY_NARROW_MIN_PER_SM = threshold
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return rows


def time_launches(launch: dict, keys_per_step, q, k_cache, v_cache, batch, label: str):
    """Time the decode kernel with ``launch`` (a dict of triton_attention, restored
    afterwards) set to every (keys per step, warps, stages): ([(seconds, setting)]
    fastest first, the time of the setting it had)."""
    defaults = launch.copy()
    timed = []
    try:
        for block_n, warps, stages in itertools.product(keys_per_step, (4, 8), (2, 3, 4)):
            launch.update(block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                seconds = bench_graph(
                    lambda: paged_attention_from_cache(q, k_cache, v_cache, batch, DIM**-0.5)
                )
            except Exception as error:  # a setting this GPU cannot launch
                print(f"{label} {block_n},{warps},{stages}: {type(error).__name__}")
                continue
            timed.append((seconds, (block_n, warps, stages)))
    finally:  # the engine's setting back, even if a launch raised
        launch.update(defaults)
    timed.sort()
    default = next((t for t, c in timed if c == tuple(defaults.values())), float("nan"))
    return timed, default


def batch1_launch(copy_bw: float, device) -> list[dict]:
    """Batch 1 (few programs, so each one's loop latency shows) on a bf16 cache: keys
    per step, warps and stages of the decode launch, Llama-3-8B's packed grouped-query
    programs (DECODE_LAUNCH_GQA) and Llama-2-7B's one head per program (DECODE_LAUNCH_SPLIT),
    at the default split count."""
    rows = []
    for kv_heads, kind in ((8, "DECODE_LAUNCH_GQA"), (32, "DECODE_LAUNCH_SPLIT")):
        total_blocks = 32768 // BLOCK + 64
        k_cache = torch.randn(
            total_blocks, BLOCK, kv_heads, DIM, device=device, dtype=torch.bfloat16
        )
        v_cache = torch.randn_like(k_cache)
        launch = getattr(triton_attention, kind)
        for context in (384, 4096, 32768):
            batch = paged_batch([1], [context], device, total_blocks)
            q = torch.randn(1, HEADS, DIM, device=device, dtype=torch.bfloat16)
            moved = 2 * context * kv_heads * DIM * k_cache.element_size()
            timed, default = time_launches(
                launch, (64, 128, 256), q, k_cache, v_cache, batch, f"{kind} {context}"
            )
            row = {"kv_heads": kv_heads, "launch": kind, "context": context}
            row |= sweep_summary(timed, default, moved, copy_bw)
            rows.append(row)
            print(f"batch1 launch {row}", flush=True)
        del k_cache, v_cache
    return rows


# (MII_SPLIT_KV_MERGE, MII_ATTENTION_EARLY_LOADS): neither, each alone, both.
STEP_VARIANTS = {
    "plain": ("launch", "off"),
    "early_loads": ("launch", "on"),
    "merge_in_kernel": ("kernel", "off"),
    "both": ("kernel", "on"),
}


def batch1_step(device) -> list[dict]:
    """Batch 1, bf16: the part of a decode layer around attention as the engine runs
    it (one CUDA graph with PDL: qkv projection, rotary + KV write, attention, o
    projection, Llama-2-7B's 32 KV heads and Llama-3-8B's 8), each variant of
    ``STEP_VARIANTS``: what the in-kernel merge and the pre-wait work save where the
    kernels meet, which timing attention alone does not show."""
    from mii.ops.rotary import rotary_cos_sin

    switches = ("MII_SPLIT_KV_MERGE", "MII_ATTENTION_EARLY_LOADS")
    saved = {name: os.environ.get(name) for name in switches}
    inv_freq = 1.0 / (10000 ** (torch.arange(0, DIM, 2, device=device).float() / DIM))
    cos_sin = rotary_cos_sin(inv_freq, 32768 + 1)
    rows = []
    for kv_heads in (32, 8):
        total_blocks = 32768 // BLOCK + 64
        shape = (total_blocks, BLOCK, kv_heads, DIM)
        caches = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(2)]
        hidden = HEADS * DIM
        # two layers' weights, together past the L2 cache, as consecutive layers read them
        weights = [
            (
                torch.randn((HEADS + 2 * kv_heads) * DIM, hidden, device=device).bfloat16(),
                torch.randn(hidden, hidden, device=device).bfloat16(),
            )
            for _ in range(2)
        ]
        x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
        for context in (384, 4096, 32768):
            batch = paged_batch([1], [context], device, total_blocks)
            positions = torch.tensor([context - 1], device=device)
            step = functools.partial(
                _attention_layers, x, weights, caches, cos_sin, positions, batch, kv_heads
            )
            row = {"kv_heads": kv_heads, "context": context}
            try:
                for name, (merge, early) in STEP_VARIANTS.items():
                    os.environ["MII_SPLIT_KV_MERGE"] = merge
                    os.environ["MII_ATTENTION_EARLY_LOADS"] = early
                    row[f"{name}_us"] = round(bench_graph(step) * 1e6 / len(weights), 2)
            finally:  # the caller's settings back
                for name, value in saved.items():
                    os.environ.pop(name, None)
                    if value is not None:
                        os.environ[name] = value
            rows.append(row)
            print(f"batch1 step {row}", flush=True)
        del caches, weights
    return rows


def _attention_layers(x, weights, caches, cos_sin, positions, batch, kv_heads) -> None:
    """For each (qkv, o) weight pair: qkv projection, rotary + KV write, attention
    from the cache, o projection (the skinny kernel, as batch 1 decodes)."""
    from mii.ops.triton_attention import rotary_cache_write
    from mii.ops.triton_gemv import skinny_linear

    k_cache, v_cache = caches
    for w_qkv, w_o in weights:
        qkv = skinny_linear(x, w_qkv).view(1, -1, DIM)
        q, k, v = qkv.split([HEADS, kv_heads, kv_heads], dim=1)
        rotary_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, batch.slot_mapping)
        out = paged_attention_from_cache(q, k_cache, v_cache, batch, DIM**-0.5)
        skinny_linear(out.view(1, -1), w_o)


def batch1_splits(caches: dict, copy_bw: float, total_blocks: int, device) -> list[dict]:
    """Batch 1 at short contexts is bound by latency, not bytes: time the fewest keys
    per split-KV program (``SPLIT_MIN_KEYS``), which trades serial loop trips for a
    merge launch."""
    rows = []
    for (name, (k_cache, v_cache)), context in itertools.product(
        caches.items(), (256, 512, 1024, 4096)
    ):
        batch = paged_batch([1], [context], device, total_blocks)
        q = torch.randn(1, HEADS, DIM, device=device, dtype=torch.bfloat16)
        row = {"cache": name, "context": context}
        for min_keys in (32, 64, 128, 256, 512):
            seconds = bench_graph(
                lambda q=q, b=batch, k=k_cache, v=v_cache, m=min_keys: paged_attention_from_cache(
                    q, k, v, b, DIM**-0.5, split_min_keys=m
                )
            )
            row[f"us_min_keys_{min_keys}"] = round(seconds * 1e6, 2)
        rows.append(row)
        print(f"batch 1, {name} x {context}: {row}", flush=True)
    return rows


if __name__ == "__main__":
    main()
