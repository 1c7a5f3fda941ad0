"""The dense layers' GEMMs at decode-pass and prompt-pass row counts: cuBLAS as the
engine calls it (``F.linear``) against what other GEMM choices reach on the same
shapes, before any of them is wired into the engine.

    python benchmarks/gemm_sweep.py --mode cublas [--json out.json]
    python benchmarks/gemm_sweep.py --mode tunableop --tunableop-file out.csv
    python benchmarks/gemm_sweep.py --mode inductor   # torch.compile max-autotune

W1 Llama-3-8B's decode-only passes hold ~233 sequences; its gate/up GEMM ran at 521
TFLOP/s there (eighteenth session: cuBLAS's 256 x 128 tiles, 224 of them on 132
multiprocessors, 1.7 waves), o at 462, qkv at 515. ``tunableop``: PyTorch's
TunableOp times the cuBLAS / cuBLASLt candidates it has per shape and keeps the
fastest (its choices land in ``--tunableop-file``). ``inductor``: torch.compile's
max-autotune times its Triton GEMM templates (persistent TMA ones on Hopper) against
cuBLAS per shape and prints each shape's table. Each mode in its own process: both
change how later matmuls of the process run. Times are CUDA-graph replays.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import SHAPES, environment, roofline, write_json
from benchmarks.kernel_times import bench_graph

# Rows: decode-only passes (W1: ~233 sequences, graphs padded up), a serving-sized
# mixed pass and the default token budget.
ROWS = (128, 240, 256, 1024, 4096)


def layer_gemms(config: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of a Llama-layout layer's four GEMMs (fused qkv and gate/up)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = hidden // heads
    return {
        "qkv": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o": (hidden, hidden),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("cublas", "tunableop", "inductor"), default="cublas")
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "llama2-7b"])
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--tunableop-file", default="tunableop_results.csv")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {"benchmark": "gemm_sweep", "mode": args.mode, **environment()}
    result["roofline"] = roofline(device)
    if args.mode == "tunableop":
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_filename(args.tunableop_file)
    rows = []
    for model in args.models:
        for name, (n, k) in layer_gemms(SHAPES[model]).items():
            weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5
            for m in args.rows:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                fn = _gemm(args.mode, weight)
                out = fn(x)  # (TunableOp tunes, Inductor autotunes, here)
                # the same product as float32's, whichever kernel the mode chose
                expected = (x.float() @ weight.float().T).to(out.dtype)
                torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
                seconds = bench_graph(lambda fn=fn, x=x: fn(x))
                tflops = 2 * m * n * k / seconds / 1e12
                rows.append(
                    {"model": model, "gemm": name, "m": m, "n": n, "k": k,
                     "us": round(seconds * 1e6, 2), "tflops": round(tflops, 1)}
                )  # fmt: skip
                print(
                    f"{args.mode:9s} {model:10s} {name:8s} M={m:5d} N={n:6d} K={k:6d}: "
                    f"{seconds * 1e6:8.2f} us {tflops:6.1f} TFLOP/s",
                    flush=True,
                )
    result["rows"] = rows
    if args.mode == "tunableop":
        # torch 2.11 has no write_file: it writes the set_filename file at exit.
        write_file = getattr(torch.cuda.tunable, "write_file", None)
        if write_file is not None:
            write_file(args.tunableop_file)
    write_json(args.json, result)


def _gemm(mode: str, weight: torch.Tensor):
    """x -> x @ weight.T as ``mode`` runs it."""
    if mode != "inductor":
        return lambda x: F.linear(x, weight)
    import torch._inductor.config as inductor

    inductor.max_autotune_gemm_backends = "ATEN,TRITON"
    return torch.compile(
        lambda x: F.linear(x, weight), mode="max-autotune-no-cudagraphs", dynamic=False
    )


if __name__ == "__main__":
    main()
