"""Offline throughput: N requests with input lengths uniform in a range and a
fixed output length (W1: Llama-2-7B shape, bf16, 256 requests, input
U[128, 1024], output 128).

    python benchmarks/throughput.py [--num-requests 256] [--hf] [--json out.json]

Reports requests/s, output tok/s and total tok/s for mii, the same for the
Hugging Face ``generate_batch`` peer on the same prompts, and the compute floor
(2 x params x tokens over measured bf16 matmul rate; with ``--quantization fp8``
still the bf16 floor: compare the seconds with a bf16 run's).
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
    num_params,
    roofline,
    serve_other_ranks,
    write_json,
)


def workload(n: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 31000) for _ in range(rng.randint(low, high))] for _ in range(n)]


async def run_mii(path: str, prompts: list[list[int]], out_len: int, options: dict) -> dict:
    start_load = time.perf_counter()
    engine = mii.AsyncEngine(path, load_format="dummy", dtype="bfloat16", **options)
    load_s = time.perf_counter() - start_load
    warmup = {
        "compile_s": round(engine.core.compile_s, 1),
        "graph_capture_s": round(engine.core.graph_capture_s, 1),
    }
    params = dict(max_new_tokens=out_len, ignore_eos=True, do_sample=False)
    await engine.generate(prompts[:8], **params)  # warm-up
    start = time.perf_counter()
    responses = await engine.generate(prompts, **params)
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    scheduling = {
        "token_budget": engine.config.token_budget,
        "max_num_seqs": engine.config.max_num_seqs,
    }
    await engine.aclose()
    generated = sum(r.generated_length for r in responses)
    assert generated == out_len * len(prompts)
    return (
        _rates(elapsed, prompts, generated)
        | {
            "load_s": round(load_s, 1),
            "preemptions": stats["preemptions"],
        }
        | scheduling
        | warmup
    )


def run_hf(config: dict, prompts: list[list[int]], out_len: int) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = hf_config(config)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    gen = GenerationConfig(
        max_new_tokens=out_len, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    start = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=gen)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    del model
    torch.cuda.empty_cache()
    return _rates(elapsed, prompts, generated)


def _rates(elapsed: float, prompts: list[list[int]], generated: int) -> dict:
    prompt_tokens = sum(map(len, prompts))
    return {
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(prompts) / elapsed, 2),
        "output_tok_s": round(generated / elapsed, 1),
        "total_tok_s": round((generated + prompt_tokens) / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-range", type=int, nargs=2, default=(128, 1024))
    parser.add_argument("--output-len", type=int, default=128)
    # Engine defaults unless told: they are what users (and W1's targets) get.
    parser.add_argument("--token-budget", type=int, default=None, help="default: the engine's")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    parser.add_argument("--hf", action="store_true", help="also run HF generate_batch")
    add_engine_arguments(parser)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = SHAPES[args.model]
    prompts = workload(args.num_requests, *args.input_range)
    result = {"benchmark": "throughput", "model": args.model, **environment()}
    result["workload"] = {
        "requests": args.num_requests,
        "input_range": list(args.input_range),
        "output_len": args.output_len,
        "prompt_tokens": sum(map(len, prompts)),
    }
    result["roofline"] = roofline(torch.device("cuda"))
    tokens = result["workload"]["prompt_tokens"] + args.num_requests * args.output_len
    if result["roofline"]:
        flops = 2 * num_params(config, active=True) * tokens  # a MoE counts its routed experts
        floor = flops / (result["roofline"]["matmul_bf16_tflops"] * 1e12)
        result["compute_floor_s"] = round(floor, 2)
    options = {
        name: value
        for name, value in (
            ("token_budget", args.token_budget),
            ("max_num_seqs", args.max_num_seqs),
        )
        if value is not None
    }
    options = engine_options(args, result, options)
    if serve_other_ranks(model_dir(args.model), options):
        return  # a rank > 0 of a tensor-parallel run: rank 0 measures and reports
    result["mii"] = asyncio.run(run_mii(model_dir(args.model), prompts, args.output_len, options))
    if "compute_floor_s" in result:
        result["mii"]["x_compute_floor"] = round(
            result["mii"]["seconds"] / result["compute_floor_s"], 2
        )
    if args.hf:
        try:
            result["hf_generate_batch"] = run_hf(config, prompts, args.output_len)
            result["speedup_vs_hf"] = round(
                result["hf_generate_batch"]["seconds"] / result["mii"]["seconds"], 2
            )
        except Exception as err:  # the peer's API moves between transformers versions
            result["hf_generate_batch"] = {"error": f"{type(err).__name__}: {err}"}
    write_json(args.json, result)


if __name__ == "__main__":
    main()
