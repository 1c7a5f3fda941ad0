"""Structured output: a batch of JSON-schema requests against the same batch
unconstrained (issue 18, item 6: constrained decoding should cost at most 10 % of
throughput), and the grammar compile time.

    python benchmarks/structured.py [--num-requests 64] [--schemas 16] [--json out.json]

Random weights of a real shape (Llama-2-7B, bf16) and a tokenizer of the model's
full vocabulary (the mask's cost grows with it). The runs, in order:

1. ``compile``: every distinct schema compiled once, cold (xgrammar, this
   tokenizer): total and per-schema seconds.
2. ``constrained``: the requests, each with its schema (cycling over
   ``--schemas`` of them), their grammars already cached: the steady state. A
   grammar decides where each answer ends, so the lengths differ.
3. ``unconstrained``: the same prompts, each asked for exactly the length its
   constrained answer had (``ignore_eos``), so both runs generate the same tokens
   per request and their tok/s compare like for like.

The overhead is 1 - constrained / unconstrained output tok/s. Passes that sample
a constrained row are resolved synchronously under async scheduling (their next
mask needs their tokens: docs/structured_output.md); ``--sync-scheduling`` runs
both batches synchronously, isolating the mask's own cost.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import mii
from benchmarks.common import (
    SHAPES,
    add_engine_arguments,
    engine_options,
    environment,
    model_dir,
    write_json,
)

WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue"]


def schema(rng: random.Random) -> dict:
    """A JSON schema of a realistic API-response shape whose answers stay bounded:
    nested objects, arrays, enums, bounded numbers and strings, required fields."""

    def leaf() -> dict:
        kind = rng.choice(["integer", "number", "string", "enum", "boolean"])
        if kind == "integer":
            low = rng.randint(-100, 100)
            return {"type": "integer", "minimum": low, "maximum": low + rng.randint(1, 10000)}
        if kind == "number":
            return {"type": "number", "minimum": 0, "maximum": rng.randint(1, 1000)}
        if kind == "string":
            return {"type": "string", "maxLength": rng.randint(4, 24)}
        if kind == "enum":
            return {"enum": rng.sample(WORDS, rng.randint(2, 5))}
        return {"type": "boolean"}

    def obj(depth: int) -> dict:
        names = [f"field_{i}" for i in range(rng.randint(2, 5))]
        props = {}
        for name in names:
            roll = rng.random()
            if depth < 2 and roll < 0.25:
                props[name] = obj(depth + 1)
            elif roll < 0.4:
                props[name] = {"type": "array", "items": leaf(), "maxItems": rng.randint(1, 4)}
            else:
                props[name] = leaf()
        return {"type": "object", "properties": props, "required": names}

    return obj(0)


def prompts(n: int, low: int, high: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    first = min(100, vocab // 2)  # past the special tokens
    return [[rng.randrange(first, vocab) for _ in range(rng.randint(low, high))] for _ in range(n)]


async def run(args, path: str, options: dict) -> dict:
    rng = random.Random(0)
    schemas = [schema(rng) for _ in range(args.schemas)]
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    batch = prompts(args.num_requests, *args.input_range, vocab)
    engine = mii.AsyncEngine(path, load_format="dummy", dtype="bfloat16", **options)
    grammars = engine.core.intake.grammars
    result: dict = {}
    try:
        # 1. compile, cold
        times = []
        for s in schemas:
            params = mii.config.GenerateParams.parse(json_schema=s)
            start = time.perf_counter()
            await asyncio.to_thread(grammars.get, params.constraint)
            times.append(time.perf_counter() - start)
        result["compile"] = {
            "schemas": len(schemas),
            "total_s": round(sum(times), 3),
            "median_ms": round(1000 * statistics.median(times), 2),
            "max_ms": round(1000 * max(times), 2),
        }
        await engine.generate(batch[:4], max_new_tokens=8, ignore_eos=True)  # warm-up

        # 2. constrained (grammars cached), 3. unconstrained at the same lengths; in
        # turns, --repeat times, keeping each one's best (warm-up effects cancel out).
        def constrained(i: int) -> dict:
            return {"json_schema": schemas[i % len(schemas)], "max_new_tokens": args.max_tokens}

        common = {"do_sample": False}
        for _ in range(args.repeat):
            start = time.perf_counter()
            answers = await asyncio.gather(
                *(engine.generate([p], **common, **constrained(i)) for i, p in enumerate(batch))
            )
            elapsed = time.perf_counter() - start
            answers = [a[0] for a in answers]
            lengths = [a.generated_length for a in answers]
            best = result.get("constrained", {}).get("seconds", float("inf"))
            if elapsed < best:
                result["constrained"] = _rates(elapsed, lengths) | {
                    "finished_stop": sum(a.finish_reason == "stop" for a in answers),
                    "mean_output_len": round(statistics.mean(lengths), 1),
                }
            start = time.perf_counter()
            await asyncio.gather(
                *(
                    engine.generate([p], **common, max_new_tokens=n, ignore_eos=True)
                    for p, n in zip(batch, lengths)
                )
            )
            elapsed = time.perf_counter() - start
            if elapsed < result.get("unconstrained", {}).get("seconds", float("inf")):
                result["unconstrained"] = _rates(elapsed, lengths)
        result["sample_answer"] = answers[0].generated_text[:300]
    finally:
        await engine.aclose()
    ratio = result["constrained"]["output_tok_s"] / result["unconstrained"]["output_tok_s"]
    result["throughput_overhead_pct"] = round(100 * (1 - ratio), 1)
    return result


def _rates(elapsed: float, lengths: list[int]) -> dict:
    return {
        "seconds": round(elapsed, 3),
        "output_tokens": sum(lengths),
        "output_tok_s": round(sum(lengths) / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--schemas", type=int, default=16, help="distinct schemas (cycled)")
    parser.add_argument("--input-range", type=int, nargs=2, default=(128, 512))
    parser.add_argument("--max-tokens", type=int, default=256, help="cap per answer")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each batch (best kept)")
    parser.add_argument(
        "--path", default=None, help="a checkpoint folder instead of --model's shape (smoke runs)"
    )
    add_engine_arguments(parser)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    result = {"benchmark": "structured", "model": args.model, **environment()}
    result["workload"] = {
        "requests": args.num_requests,
        "schemas": args.schemas,
        "input_range": list(args.input_range),
        "max_tokens": args.max_tokens,
        "repeat": args.repeat,
    }
    options = engine_options(args, result, {})
    path = args.path or model_dir(args.model, full_vocab=True)
    result |= asyncio.run(run(args, path, options))
    for key in ("compile", "constrained", "unconstrained", "throughput_overhead_pct"):
        print(key, result[key])
    write_json(args.json, result)


if __name__ == "__main__":
    main()
