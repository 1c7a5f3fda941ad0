"""Batch-1 latency: one request, a 128-token prompt, 256 new tokens.

    python benchmarks/latency.py [--model llama2-7b] [--json out.json] [--hf]
    python benchmarks/latency.py --quantization fp8   # float8 weights: floor of 1 byte each
    python benchmarks/latency.py --batch 2   # two requests at once: decode steps of 2 rows

With ``--batch N`` N requests (different prompts of the same length) run at once,
and decode tokens/s is per request (the slowest one's): decode steps per second,
which the bandwidth floor bounds as at batch 1 (the weights are read once a step).

Reports mii's time to first token and decode tokens/s, the Hugging Face
``generate`` peer on the same workload and weights, and the bandwidth floor
(bytes of weights per token over measured copy bandwidth).
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

import mii
from benchmarks.common import (
    SHAPES,
    add_engine_arguments,
    engine_options,
    environment,
    hf_config,
    model_dir,
    roofline,
    serve_other_ranks,
    timed_stream,
    weight_bytes,
    write_json,
)


async def run_mii(
    path: str, prompts: list[list[int]], new_tokens: int, repeats: int, options: dict
) -> dict:
    engine = mii.AsyncEngine(path, load_format="dummy", dtype="bfloat16", **options)
    warmup = {"compile_s": engine.core.compile_s, "graph_capture_s": engine.core.graph_capture_s}
    params = dict(max_new_tokens=new_tokens, ignore_eos=True, do_sample=False)
    async for _ in engine.stream(prompts[0], **params):  # warm-up
        pass
    runs = [await timed_batch(engine, prompts, params) for _ in range(repeats)]
    await engine.aclose()
    best = sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]
    return {k: round(v, 4) for k, v in (best | warmup).items()}


async def timed_batch(engine, prompts: list[list[int]], params: dict) -> dict:
    """The prompts streamed at once: the last first token, the slowest decode rate."""
    runs = await asyncio.gather(*(timed_stream(engine, p, params) for p in prompts))
    return {
        "ttft_s": max(r["ttft_s"] for r in runs),
        "decode_tok_s": min(r["decode_tok_s"] for r in runs),
    }


def run_hf(config: dict, prompt_ids: list[int], new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = hf_config(config)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt_ids], device="cuda")
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return {"total_s": round(total, 3), "tok_s": round(new_tokens / total, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="requests at once (mii only)")
    parser.add_argument("--hf", action="store_true", help="also run the Hugging Face peer")
    add_engine_arguments(parser)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = SHAPES[args.model]
    path = model_dir(args.model)
    prompt_ids = [(i * 7919) % 31000 + 100 for i in range(args.prompt_len)]
    # one prompt per request, each its own tokens (nothing shared in the prefix cache)
    # (the first is prompt_ids itself: batch 1 times the prompt it always did, as HF does)
    prompts = [[(t - 100 + 13 * r) % 31000 + 100 for t in prompt_ids] for r in range(args.batch)]
    device = torch.device("cuda")
    result = {"benchmark": "latency", "model": args.model, "batch": args.batch, **environment()}
    result["roofline"] = roofline(device)
    # The floor of the weights this run reads: one byte per linear weight in fp8.
    result["weight_bytes"] = weight_bytes(config, args.quantization)
    if result["roofline"]:
        floor_s = result["weight_bytes"] / (result["roofline"]["copy_tb_per_s"] * 1e12)
        result["bandwidth_floor_tok_s"] = round(1 / floor_s, 1)
    options = engine_options(args, result, {})
    if serve_other_ranks(path, options):
        return  # a rank > 0 of a tensor-parallel run: rank 0 measures and reports
    result["mii"] = asyncio.run(run_mii(path, prompts, args.new_tokens, args.repeats, options))
    if args.hf:
        result["hf_generate"] = run_hf(config, prompt_ids, args.new_tokens)
        result["speedup_vs_hf"] = round(
            result["mii"]["decode_tok_s"] / result["hf_generate"]["tok_s"], 1
        )
    if "bandwidth_floor_tok_s" in result:
        result["fraction_of_bandwidth_floor"] = round(
            result["mii"]["decode_tok_s"] / result["bandwidth_floor_tok_s"], 3
        )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
