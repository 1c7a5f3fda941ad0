"""Serving: Poisson arrivals against a real deployment, streaming over gRPC.

    python benchmarks/serving.py --rates 4 8 12 --num-requests 200 \\
        [--prompt-mean 2600 --gen-mean 60] [--replicas 1] [--json out.json]

Per rate: time to first token (TTFT), time per output token (TPOT), inter-token
latency (ITL), p50/p99, and effective throughput in the FastGen sense: a request
counts when its first token arrives within prompt_tokens/512 s and its
generation keeps at least 4 tokens/s. Lengths are normal with a standard
deviation of 0.3 x the mean. ``--model`` is a shape name (random weights of the
real shape on GPU) or a checkpoint path; without a GPU use e.g.
``--model demo --prompt-mean 40 --gen-mean 8`` to check the machinery.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import time

import mii
from benchmarks.common import SHAPES, environment, model_dir, write_json
from mii.rpc.deployment import free_port


def lengths(rng: random.Random, mean: float, n: int, low: int = 1) -> list[int]:
    return [max(low, int(rng.gauss(mean, 0.3 * mean))) for _ in range(n)]


def prompt_of(rng: random.Random, words: list[str], tokens: int, per_word: float) -> str:
    return " ".join(rng.choice(words) for _ in range(max(1, round(tokens / per_word))))


async def one_request(client, prompt: str, gen: int, send_at: float, start: float) -> dict:
    await asyncio.sleep(max(0.0, start + send_at - time.perf_counter()))
    sent = time.perf_counter()
    stamps = []
    prompt_tokens = 0
    async for piece in client.astream(prompt, max_new_tokens=gen, ignore_eos=True):
        now = time.perf_counter()
        stamps.extend([now] * max(1, len(piece.token_ids)))
        prompt_tokens = piece.prompt_length
    ttft = stamps[0] - sent
    decode = stamps[-1] - stamps[0]
    tpot = decode / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return {
        "prompt_tokens": prompt_tokens,
        "generated": len(stamps),
        "ttft": ttft,
        "tpot": tpot,
        "itl": [b - a for a, b in itertools.pairwise(stamps)],
        "effective": ttft <= prompt_tokens / 512 and (tpot == 0.0 or 1 / tpot >= 4),
        "done_at": stamps[-1] - start,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_rate(client, rate: float, args, words: list[str], per_word: float, seed: int) -> dict:
    rng = random.Random(seed)
    n = args.num_requests
    prompts = [prompt_of(rng, words, t, per_word) for t in lengths(rng, args.prompt_mean, n)]
    gens = lengths(rng, args.gen_mean, n)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    start = time.perf_counter()
    results = await asyncio.gather(
        *(one_request(client, p, g, a, start) for p, g, a in zip(prompts, gens, arrivals))
    )
    duration = max(r["done_at"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    ms = 1e3
    return {
        "rate": rate,
        "requests": n,
        "duration_s": round(duration, 2),
        "throughput_rps": round(n / duration, 2),
        "effective_rps": round(sum(r["effective"] for r in results) / duration, 2),
        "ttft_ms": {
            "p50": round(percentile([r["ttft"] for r in results], 0.5) * ms, 1),
            "p99": round(percentile([r["ttft"] for r in results], 0.99) * ms, 1),
        },
        "tpot_ms": {
            "p50": round(percentile([r["tpot"] for r in results], 0.5) * ms, 2),
            "p99": round(percentile([r["tpot"] for r in results], 0.99) * ms, 2),
        },
        "itl_ms": {
            "p50": round(percentile(itl, 0.5) * ms, 2),
            "p99": round(percentile(itl, 0.99) * ms, 2),
        },
        "mean_prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in results), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama2-7b", help="shape name, 'demo' or a path")
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 12.0])
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--prompt-mean", type=float, default=2600)
    parser.add_argument("--gen-mean", type=float, default=60)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    options: dict = {}
    if args.model in SHAPES:
        path = model_dir(args.model)
        options = {"load_format": "dummy", "dtype": "bfloat16", "token_budget": 2048}
    elif args.model == "demo":
        from mii.demo import demo_model_path

        path = str(demo_model_path())
    else:
        path = args.model
    client = mii.serve(
        path,
        deployment_name=f"bench-serving-{free_port()}",
        replica_num=args.replicas,
        port=free_port(),
        **options,
    )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        pieces = (w.strip("Ġ▁") for w in tokenizer.get_vocab())
        words = [w for w in pieces if w.isascii() and w.isalpha()]
        words = words or ["word"]
        sample = " ".join(random.Random(0).choice(words) for _ in range(500))
        per_word = len(tokenizer(sample).input_ids) / 500  # tokens per word, to size prompts
        result = {"benchmark": "serving", "model": args.model, **environment()}
        result["workload"] = {"prompt_mean": args.prompt_mean, "gen_mean": args.gen_mean}
        result["rates"] = [
            asyncio.run(run_rate(client, rate, args, words, per_word, seed=i))
            for i, rate in enumerate(args.rates)
        ]
    finally:
        client.terminate_server()
    write_json(args.json, result)


if __name__ == "__main__":
    main()
