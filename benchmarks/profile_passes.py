"""Where a workload's time goes: torch.profiler over a batch-1 decode run and a
small mixed (prefill + decode) run; prints GPU-busy vs wall time and the top
kernels. A diagnostic, not a benchmark.

    python benchmarks/profile_passes.py [--requests 32] [--model llama3-8b] [--quantization fp8]
    MII_PDL=off python benchmarks/profile_passes.py   # kernel durations of their own
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import time

import torch
from torch.profiler import ProfilerActivity, profile

import mii
from benchmarks.common import SHAPES, model_dir
from benchmarks.throughput import workload


async def run(engine, prompts, out_len):
    return await engine.generate(prompts, max_new_tokens=out_len, ignore_eos=True, do_sample=False)


def profiled(engine, prompts, out_len, label):
    asyncio.run(run(engine, prompts[:2], 8))  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        asyncio.run(run(engine, prompts, out_len))
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    print(
        f"\n=== {label}: wall {wall * 1e3:.1f} ms, GPU busy {gpu_us / 1e3:.1f} ms "
        f"({gpu_us / 1e6 / wall:.0%})"
    )
    # compact: device time, launches and time per launch of the busiest kernels
    busiest = sorted(
        (e for e in events if e.device_type.name == "CUDA" and e.self_device_time_total > 0),
        key=lambda e: e.self_device_time_total,
        reverse=True,
    )[:18]
    print(f"{'kernel':60s} {'total ms':>9s} {'launches':>9s} {'us each':>9s}")
    for e in busiest:
        each = e.self_device_time_total / max(e.count, 1)
        print(f"{e.key[:60]:60s} {e.self_device_time_total / 1e3:9.2f} {e.count:9d} {each:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--model", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--quantization", choices=["none", "fp8"], default="none")
    args = parser.parse_args()
    quantization = None if args.quantization == "none" else args.quantization
    engine = mii.AsyncEngine(
        model_dir(args.model), load_format="dummy", dtype="bfloat16", quantization=quantization
    )
    prompt = [[(i * 7919) % 31000 + 100 for i in range(128)]]
    profiled(engine, prompt, 64, "batch 1, 128 in / 64 out")
    profiled(engine, workload(args.requests, 128, 1024), 32, f"{args.requests} requests, mixed")


if __name__ == "__main__":
    main()
