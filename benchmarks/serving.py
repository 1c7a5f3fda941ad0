"""Serving: Poisson arrivals against a real deployment, streaming, over gRPC or HTTP.

    python benchmarks/serving.py --rates 8 12 16 20 --num-requests 160 \\
        [--prompt-mean 2600 --gen-mean 60] [--http] [--json out.json]

The FastGen workload: prompts ~N(prompt_mean, 0.3 x mean) tokens, generation
~N(gen_mean, 0.3 x mean) tokens (``ignore_eos``, greedy), clipped so that prompt
+ generation fits the deployment's ``max_length`` (from its ModelInfo). Prompt
lengths are exact token counts as the server counts them (BOS included): the
gRPC and OpenAI surfaces take text only, so each prompt is random whole-word
token ids decoded to text, re-encoded and adjusted until the count is exact;
the server's own count is recorded and mismatches reported
(``prompt_tokens_off``). Details in :mod:`benchmarks.serving_load`.

Transport: by default ``client.astream`` over gRPC (one piece per token); with
``--http`` the deployment also runs its REST gateway and every request is a
``POST /v1/completions`` with ``"stream": true`` and
``"stream_options": {"include_usage": true}`` sent by one shared
``httpx.AsyncClient``, as users' load tools do (one SSE chunk per piece of text;
the token counts come from the final ``usage`` chunk).

Per offered rate: served requests/s (completed / wall time), effective
requests/s in the FastGen sense (first token within prompt_tokens/512 s and at
least 4 tokens/s after it), time to first token (TTFT), time per output token
after the first (TPOT) and inter-token latency (ITL: gaps between timed pieces,
gRPC tokens or HTTP chunks), p50/p99 in ms. A few requests warm the deployment
up first. Every rate gets prompts of the same lengths with fresh words (so
that no cache carries over between rates).

Once per run, after the deployment has stopped (the GPU holds one engine at a
time): the offline engine maximum, i.e. the first rate's exact requests
submitted all at once to an in-process ``mii.AsyncEngine`` with the same
options, in requests/s; on CUDA with a shape name also the compute floor for
those requests (2 x params x tokens over the measured bf16 matmul rate, or the
float8 rate for FP8 weights' linear layers) and the roofline that adds the prompts'
attention and the decode steps' KV reads (one byte per value with the fp8 KV cache).

``--model`` is a shape name (random weights of the real shape on GPU, with a
synthetic byte-level BPE tokenizer of the model's full vocabulary size, so that
every generated token decodes to text and is streamed as with the real
tokenizer), ``demo`` (the tiny random-weight demo model) or a checkpoint path (a ``.gguf``
file too). Engine options are the engine's defaults unless ``--token-budget`` /
``--max-num-seqs`` / ``--quantization`` / ``--kv-cache-dtype`` are given. CPU check of
the machinery: ``--model demo --prompt-mean 40 --gen-mean 8 --rates 2 --num-requests 6 [--http]``.
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
import sys
import time
from typing import Any

import mii
from benchmarks.common import (
    SHAPES,
    environment,
    model_dir,
    num_params,
    roofline,
    unquantized_params,
    write_json,
)
from benchmarks.serving_load import (
    HttpSender,
    PromptMaker,
    Request,
    Send,
    by_prompt_class,
    clipped_lengths,
    grpc_sender,
    mixed_lengths,
    poisson_arrivals,
    request_set,
    run_arrivals,
    summarize,
    timed,
)
from mii.rpc.deployment import free_port

GREEDY = {"ignore_eos": True, "do_sample": False}  # as the gRPC and HTTP senders ask


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in --help."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--model", default="llama2-7b", help="shape name, 'demo' or a path")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[8.0, 12.0, 16.0, 20.0], help="offered req/s"
    )
    parser.add_argument("--num-requests", type=int, default=160, help="requests per rate")
    parser.add_argument("--prompt-mean", type=float, default=2600, help="prompt tokens, mean")
    parser.add_argument("--gen-mean", type=float, default=60, help="generated tokens, mean")
    parser.add_argument(
        "--short-share",
        type=float,
        default=0.0,
        help="share of requests whose prompt is ~N(short-mean) instead (0: FastGen's workload)",
    )
    parser.add_argument("--short-mean", type=float, default=128, help="short prompts, mean")
    parser.add_argument("--http", action="store_true", help="drive /v1/completions (SSE)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--token-budget", type=int, default=None, help="default: the engine's")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    parser.add_argument(
        "--short-prompt-reserve", type=int, default=None, help="default: the engine's"
    )
    parser.add_argument("--quantization", choices=["none", "fp8"], default="none")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    parser.add_argument("--warmup", type=int, default=8, help="unmeasured requests first")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline maximum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def model_and_options(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The checkpoint path and the engine options of both the deployment and the
    offline engine (engine defaults unless the arguments override them)."""
    options: dict[str, Any] = {}
    if args.model in SHAPES:
        path = model_dir(args.model, full_vocab=True)  # every token streams text
        options = {"load_format": "dummy", "dtype": "bfloat16"}
    elif args.model == "demo":
        from mii.demo import random_demo_model_path  # tiny: a quick smoke run

        path = str(random_demo_model_path())
    else:
        path = args.model
    if args.token_budget is not None:
        options["token_budget"] = args.token_budget
    if args.max_num_seqs is not None:
        options["max_num_seqs"] = args.max_num_seqs
    if args.short_prompt_reserve is not None:
        options["short_prompt_reserve"] = args.short_prompt_reserve
    if args.quantization != "none":  # FP8 weights (issue 20): the deployment and offline
        options["quantization"] = args.quantization
    if args.kv_cache_dtype != "auto":
        options["kv_cache_dtype"] = args.kv_cache_dtype
    return path, options


def prompt_tokenizer(path: str):
    """The model's tokenizer as the deployment loads it (a ``.gguf`` file's too, from
    its converted checkpoint; a hub id's without its weights)."""
    from mii.models.loader import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(path, weights=False), None, False)


def log(message: str) -> None:
    print(f"[serving] {message}", file=sys.stderr, flush=True)


# ----- the deployment ---------------------------------------------------------------


async def measure(
    send: Send,
    warmup: list[Request],
    sets: list[list[Request]],
    rates: list[float],
    seed: int,
    short: list[bool] | None = None,
) -> list[dict[str, Any]]:
    """Warm up, then run each rate's requests at Poisson arrivals; one row per rate
    (with ``short``, which requests were drawn short, also one per prompt class)."""
    if warmup:
        timings = await asyncio.gather(*(timed(send, r) for r in warmup))
        if all(t.error for t in timings):
            raise RuntimeError(f"every warm-up request failed: {timings[0].error}")
    rows = []
    for i, (rate, requests) in enumerate(zip(rates, sets)):
        arrivals = poisson_arrivals(random.Random(seed + 1000 + i), rate, len(requests))
        start, timings = await run_arrivals(send, requests, arrivals)
        rows.append(summarize(rate, requests, start, timings))
        log(row_line(rows[-1]))
        if short is not None:
            classes = by_prompt_class(requests, timings, short)
            rows[-1]["by_prompt"] = {
                kind: summarize(rate, reqs, start, times)
                for kind, (reqs, times) in classes.items()
                if reqs
            }
            for kind, row in rows[-1]["by_prompt"].items():
                log(f"  {kind} prompts: {row_line(row)}")
    return rows


async def measure_deployment(
    client, http_url: str | None, model: str, work: tuple
) -> list[dict[str, Any]]:
    """``measure(send, *work)`` over gRPC, or over HTTP when the gateway's URL is given."""
    if http_url is None:
        return await measure(grpc_sender(client), *work)
    sender = HttpSender(http_url, model)
    try:
        return await measure(sender, *work)
    finally:
        await sender.aclose()


def serve_and_measure(
    args: argparse.Namespace, path: str, options: dict[str, Any], maker: PromptMaker
) -> tuple[dict[str, Any], list[list[Request]], list[Request]]:
    """Start the deployment, build the requests for its max_length, run every rate,
    stop it. Returns the part of the result it measured, the request sets (one
    per rate) and the warm-up requests."""
    http_port = free_port() if args.http else None
    started = time.perf_counter()
    client = mii.serve(
        path,
        deployment_name=f"bench-serving-{free_port()}",
        replica_num=args.replicas,
        port=free_port(),
        enable_restful_api=args.http,
        **({"restful_api_port": http_port} if http_port else {}),
        **options,
    )
    try:
        load_s = time.perf_counter() - started
        info = client.model_info()
        lengths = clipped_lengths(
            random.Random(args.seed),
            args.prompt_mean,
            args.gen_mean,
            args.num_requests,
            info.max_length,
            maker.min_tokens,
        )
        short = None
        if args.short_share:  # chat turns among long prompts
            mix = random.Random(args.seed + 7)
            lengths, short = mixed_lengths(
                mix, args.short_share, args.short_mean, lengths, info.max_length, maker.min_tokens
            )
        sets = [request_set(maker, lengths, args.seed + 1 + i) for i in range(len(args.rates))]
        warmup = request_set(maker, lengths[: args.warmup], args.seed + 999)
        # prompt + generation at exactly max_length: clipped to fit (a drawn pair of
        # exactly that length is rare enough to count with them)
        clipped = sum(1 for prompt, gen in lengths if prompt + gen == info.max_length)
        log(
            f"deployment up in {load_s:.1f} s; max_length {info.max_length}; requests built "
            f"({clipped} of {len(lengths)} clipped to fit max_length)"
        )
        http_url = f"http://127.0.0.1:{http_port}" if http_port else None
        work = (warmup, sets, args.rates, args.seed, short)
        rows = asyncio.run(measure_deployment(client, http_url, info.model, work))
    finally:
        client.terminate_server()
    measured = {
        "transport": "http /v1/completions (SSE)" if args.http else "grpc",
        "max_length": info.max_length,
        "requests_clipped_to_max_length": clipped,
        "deployment_load_s": round(load_s, 1),
        "rates": rows,
    }
    return measured, sets, warmup


# ----- offline ----------------------------------------------------------------------


async def offline_maximum(
    path: str, options: dict[str, Any], requests: list[Request], warmup: list[Request]
) -> dict[str, Any]:
    """``requests`` submitted all at once to an in-process engine (after ``warmup``
    the same way): requests/s."""
    engine = mii.AsyncEngine(path, **options)

    async def run(batch: list[Request]) -> list:
        return await asyncio.gather(
            *(engine.generate([r.prompt], max_new_tokens=r.max_new_tokens, **GREEDY) for r in batch)
        )

    try:
        await run(warmup)
        start = time.perf_counter()
        responses = await run(requests)
        elapsed = time.perf_counter() - start
    finally:
        await engine.aclose()
    generated = sum(r[0].generated_length for r in responses)
    prompt_tokens = sum(r[0].prompt_length for r in responses)
    return {
        "requests": len(requests),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(requests) / elapsed, 2),
        "output_tok_s": round(generated / elapsed, 1),
        "total_tok_s": round((generated + prompt_tokens) / elapsed, 1),
    }


def floors(
    config: dict,
    requests: list[Request],
    tflops: float,
    copy_tb_s: float,
    fp8_tflops: float | None = None,
    kv_cache_dtype: str = "auto",
) -> dict:
    """The requests' floors on a device of ``tflops`` bf16 matmul rate and
    ``copy_tb_s`` copy bandwidth: ``compute_floor_s`` (2 x params x tokens, the
    issue's ceiling; a mixture of experts counts its active parameters) and
    ``roofline_floor_s``, which adds what that leaves out: the prompts' causal
    attention FLOPs and the decode steps' reads of their sequences' KV cache, at
    copy bandwidth. A long-prompt workload is bandwidth-bound there: every
    generated token reads its whole context's KV.

    For the engine options being measured: ``fp8_tflops`` (FP8 weights) runs the
    linear layers' FLOPs at that rate (embeddings and LM head stay 16-bit, as the
    engine keeps them); ``kv_cache_dtype="fp8"`` reads one byte per cached value,
    not two. Without them a float8 run would be compared with bf16's floors and
    look faster than its roofline. (As the issue's floor, 2 FLOPs per parameter per
    token, embeddings and the LM head included for every token.)"""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    kv_dim = config["num_key_value_heads"] * h // config["num_attention_heads"]
    value_bytes = 1 if kv_cache_dtype == "fp8" else 2
    kv_bytes_per_token = layers * 2 * kv_dim * value_bytes  # K and V
    tokens = sum(r.prompt_tokens + r.max_new_tokens for r in requests)
    params = num_params(config, active=True)
    unquantized = unquantized_params(config)
    linear_tflops = fp8_tflops or tflops
    per_token_s = 2 * (unquantized / tflops + (params - unquantized) / linear_tflops) / 1e12
    compute_s = per_token_s * tokens
    attention_flops = sum(layers * 2 * 2 * r.prompt_tokens**2 // 2 * h for r in requests)
    # generated token g (1..G) reads the KV of prompt + g - 1 tokens
    kv_reads = sum(
        kv_bytes_per_token * (r.max_new_tokens * r.prompt_tokens + r.max_new_tokens**2 // 2)
        for r in requests
    )
    roofline_s = compute_s + attention_flops / (tflops * 1e12) + kv_reads / (copy_tb_s * 1e12)
    return {
        "floor_basis": {
            "weights": "fp8" if fp8_tflops else "bf16",
            "kv_cache": "fp8" if kv_cache_dtype == "fp8" else "bf16",
        },
        "compute_floor_s": round(compute_s, 2),
        "compute_ceiling_rps": round(len(requests) / compute_s, 2),
        "roofline_floor_s": round(roofline_s, 2),
        "roofline_ceiling_rps": round(len(requests) / roofline_s, 2),
    }


def compute_floor(model: str, requests: list[Request], options: dict[str, Any]) -> dict[str, Any]:
    """On CUDA with a shape name: the requests' floors (``floors``) on the
    measured roofline, for the engine ``options``' weights and KV cache, and the
    requests/s they allow."""
    import torch

    if model not in SHAPES or not torch.cuda.is_available():
        return {}
    fp8_weights = options.get("quantization") == "fp8"
    rates = roofline(torch.device("cuda"), fp8=fp8_weights)
    return rates | floors(
        SHAPES[model],
        requests,
        rates["matmul_bf16_tflops"],
        rates["copy_tb_per_s"],
        fp8_tflops=rates.get("matmul_fp8_tflops") if fp8_weights else None,
        kv_cache_dtype=options.get("kv_cache_dtype", "auto"),
    )


# ----- report -----------------------------------------------------------------------


def row_line(row: dict[str, Any]) -> str:
    def pair(key: str) -> str:
        return f"{row[key]['p50']:.1f}/{row[key]['p99']:.1f}"

    return (
        f"{row['offered_rps']:>7.1f} {row['served_rps']:>7.2f} {row['effective_rps']:>9.2f} "
        f"{pair('ttft_ms'):>17} {pair('tpot_ms'):>15} {pair('itl_ms'):>15} "
        f"{row['completed']:>4}/{row['requests']:<4} {row['prompt_tokens_off']:>4}"
    )


def print_table(result: dict[str, Any]) -> None:
    """The rows of the JSON as a table (after it, so that logs end with the numbers)."""
    print(f"\nserving {result['model']} over {result['transport']}, workload {result['workload']}")
    print(
        f"{'offered':>7} {'served':>7} {'effective':>9} {'TTFT p50/p99 ms':>17} "
        f"{'TPOT p50/p99 ms':>15} {'ITL p50/p99 ms':>15} {'done':>9} {'off':>4}"
    )
    for row in result["rates"]:
        print(row_line(row))
    offline = result.get("offline_maximum")
    if offline:
        print(
            f"offline engine maximum: {offline['requests_per_s']} req/s "
            f"({offline['requests']} requests in {offline['seconds']} s)"
        )
    if "compute_floor" in result:
        floor = result["compute_floor"]
        basis = floor["floor_basis"]
        print(
            f"floors for {basis['weights']} weights, {basis['kv_cache']} KV cache: "
            f"compute floor {floor['compute_floor_s']} s = ceiling "
            f"{floor['compute_ceiling_rps']} req/s; with attention and decode KV reads "
            f"{floor['roofline_floor_s']} s = {floor['roofline_ceiling_rps']} req/s; "
            f"offline x floor {floor.get('offline_x_floor')}, x roofline "
            f"{floor.get('offline_x_roofline')}"
        )


def main() -> None:
    args = parse_args()
    path, options = model_and_options(args)
    maker = PromptMaker(prompt_tokenizer(path))
    result: dict[str, Any] = {"benchmark": "serving", "model": args.model, **environment()}
    result["engine_options"] = options
    result["workload"] = {
        "prompt_mean": args.prompt_mean,
        "gen_mean": args.gen_mean,
        "requests_per_rate": args.num_requests,
    }
    if args.short_share:
        result["workload"] |= {"short_share": args.short_share, "short_mean": args.short_mean}
    measured, sets, warmup = serve_and_measure(args, path, options, maker)
    result |= measured
    result["workload"]["mean_prompt_tokens"] = round(
        sum(r.prompt_tokens for r in sets[0]) / len(sets[0]), 1
    )
    result["workload"]["mean_gen_tokens"] = round(
        sum(r.max_new_tokens for r in sets[0]) / len(sets[0]), 1
    )
    if not args.no_offline:
        log("offline engine maximum for the first rate's requests")
        result["offline_maximum"] = asyncio.run(offline_maximum(path, options, sets[0], warmup))
        floor = compute_floor(args.model, sets[0], options)
        if floor:
            seconds = result["offline_maximum"]["seconds"]
            result["compute_floor"] = floor | {
                "offline_x_floor": round(seconds / floor["compute_floor_s"], 2),
                "offline_x_roofline": round(seconds / floor["roofline_floor_s"], 2),
            }
    write_json(args.json, result)
    print_table(result)


if __name__ == "__main__":
    main()
