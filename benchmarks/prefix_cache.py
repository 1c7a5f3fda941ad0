"""Prefix caching on vs off, in one process (issue 17; DESIGN.md "Shared prefixes").

    python benchmarks/prefix_cache.py [--model llama3-8b] [--json out.json]

Three workloads, each run with ``enable_prefix_caching`` on and off, engine
defaults otherwise, random weights of the real shape, greedy, ``ignore_eos``:

- shared: 256 requests = one 2,000-token system prompt + a unique 100-token
  suffix, 128 output tokens, all submitted at once;
- chat: 64 conversations x 5 turns; each turn resends the whole history (earlier
  user turns of 100 tokens and the answers of 128 tokens) plus a new user turn;
  the 64 conversations' turn k run together, turn k+1 after them;
- w1: W1 (256 requests, input U[128, 1024], 128 out), nothing shared.

Reports seconds, requests/s, output tok/s and time-to-first-token p50/p99 per
run (each request streamed; TTFT from its submission), the prefix cache's hit
tokens, and the on/off ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import random
import statistics
import time

import mii
from benchmarks.common import SHAPES, environment, model_dir, write_json
from benchmarks.throughput import workload

OUT = 128


def shared_prompts(n: int = 256, prefix: int = 2000, suffix: int = 100, seed: int = 0):
    rng = random.Random(seed)
    system = [rng.randrange(100, 31000) for _ in range(prefix)]
    return [system + [rng.randrange(100, 31000) for _ in range(suffix)] for _ in range(n)]


async def timed_request(engine, prompt: list[int], ttfts: list[float]) -> list[int]:
    start = time.perf_counter()
    first = None
    tokens: list[int] = []
    async for piece in engine.stream(prompt, max_new_tokens=OUT, ignore_eos=True, do_sample=False):
        if first is None:
            first = time.perf_counter() - start
        tokens.extend(piece.token_ids)
    ttfts.append(first)
    return tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(engine, workload_name: str) -> dict:
    ttfts: list[float] = []
    requests = 0
    start = time.perf_counter()
    if workload_name == "shared":
        prompts = shared_prompts()
        await asyncio.gather(*(timed_request(engine, p, ttfts) for p in prompts))
        requests = len(prompts)
    elif workload_name == "w1":
        prompts = workload(256, 128, 1024)
        await asyncio.gather(*(timed_request(engine, p, ttfts) for p in prompts))
        requests = len(prompts)
    else:  # chat
        rng = random.Random(1)
        histories = [[] for _ in range(64)]
        for _turn in range(5):
            for history in histories:
                history.extend(rng.randrange(100, 31000) for _ in range(100))
            answers = await asyncio.gather(
                *(timed_request(engine, list(h), ttfts) for h in histories)
            )
            for history, answer in zip(histories, answers):
                history.extend(answer)
            requests += len(histories)
    seconds = time.perf_counter() - start
    stats = engine.stats()
    return {
        "seconds": round(seconds, 2),
        "requests_per_s": round(requests / seconds, 2),
        "output_tok_s": round(requests * OUT / seconds, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 0.99), 1),
        "prefix_cache_hit_tokens": stats["prefix_cache_hits"],
        "prefix_cache_query_tokens": stats["prefix_cache_queries"],
    }


async def main_async(args) -> dict:
    result = {"benchmark": "prefix_cache", "model": args.model, **environment()}
    path = model_dir(args.model)
    for caching in (True, False):
        engine = mii.AsyncEngine(
            path, load_format="dummy", dtype="bfloat16", enable_prefix_caching=caching
        )
        await engine.generate([[1] * 64] * 4, max_new_tokens=4)  # warm-up
        for name in args.workloads:
            engine.core.blocks.reset_prefix_cache()  # nothing carried over between workloads
            key = f"{name}_{'on' if caching else 'off'}"
            result[key] = await run(engine, name)
            print(key, result[key], flush=True)
        await engine.aclose()
    for name in args.workloads:
        on, off = result[f"{name}_on"], result[f"{name}_off"]
        result[f"{name}_ratio"] = {
            "throughput_on_over_off": round(on["output_tok_s"] / off["output_tok_s"], 2),
            "ttft_p50_off_over_on": round(off["ttft_p50_ms"] / on["ttft_p50_ms"], 2),
        }
        print(name, result[f"{name}_ratio"], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--workloads", nargs="+", default=["shared", "chat", "w1"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    write_json(args.json, asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
