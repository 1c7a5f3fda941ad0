"""Prompt attention: the engine's paged prompt kernel against the attention
libraries torch ships (flash SDPA, cuDNN SDPA), in TFLOP/s of causal attention.

    python benchmarks/attention_peers.py [--json out.json]

A diagnostic for issue 19's 32k-prompt target: is a library kernel fast enough on
this GPU to be worth running the long prompt chunks through? Cases (32 query heads
of 128, bf16, 16-token cache blocks):

- ``prompt-4096``: one causal prompt, whole;
- ``chunk-4096@32k``: the last 4,096-token chunk of a 32,768-token prompt with 8
  KV heads (what the engine runs at its default 4,096-token budget: 28,672 cached
  keys, then the causal diagonal). A library takes it as two calls, the cached
  keys without a mask and the diagonal causal, merged by their log-sum-exps
  (timed with the merge); SDPA also as one call with a lower-right causal mask
  (the backend torch picks for it);
- ``prompt-32768``: the whole 32k prompt as one causal pass, 8 KV heads.

Peers see the KV heads repeated to 32 (the repeat is not timed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from benchmarks.common import environment, write_json
from benchmarks.kernel_times import BLOCK, DIM, HEADS, bench, paged_batch
from benchmarks.prefill_sweep import causal_flops
from mii.ops.triton_attention import paged_attention_from_cache

CASES = {
    # name: (queries, keys, KV heads)
    "prompt-4096": (4096, 4096, 32),
    "chunk-4096@32k": (4096, 32768, 8),
    "prompt-32768": (32768, 32768, 8),
}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def library_call(backend: SDPBackend, q, k, v, causal: bool) -> Callable[[], torch.Tensor]:
    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def with_lse(backend: str, q, k, v, causal: bool):
    """(out, log-sum-exp [B, H, Q]) from the backend's own op."""
    if backend == "cudnn":
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False
        )
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
    return out[0], out[1].reshape(out[0].shape[:-1]).float()


def merged_chunk(backend: str, q, k, v, cached: int) -> Callable[[], torch.Tensor]:
    """The chunk as two library calls (cached keys, then the diagonal), merged."""

    def call():
        out_a, lse_a = with_lse(backend, q, k[:, :, :cached], v[:, :, :cached], False)
        out_b, lse_b = with_lse(backend, q, k[:, :, cached:], v[:, :, cached:], True)
        lse = torch.logaddexp(lse_a, lse_b)
        weight_a = torch.exp(lse_a - lse).unsqueeze(-1)
        return out_a * weight_a + out_b * (1 - weight_a)

    return call


def peers(queries: int, keys: int, device) -> dict[str, float]:
    q = torch.randn(1, HEADS, queries, DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, HEADS, keys, DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    seconds = {}
    for name, backend in BACKENDS.items():
        try:
            if queries == keys:
                seconds[name] = bench(library_call(backend, q, k, v, True))
            else:
                seconds[f"{name}_two_calls"] = bench(merged_chunk(name, q, k, v, keys - queries))
        except Exception as err:  # a backend this torch / GPU does not offer
            print(f"  {name}: not run ({str(err).splitlines()[0][:120]})", flush=True)
    if queries != keys:
        try:
            mask = causal_lower_right(queries, keys)
            seconds["sdpa_lower_right"] = bench(
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            )
        except Exception as err:
            print(f"  lower-right mask: not run ({str(err).splitlines()[0][:120]})", flush=True)
    return seconds


def mii_seconds(queries: int, keys: int, kv_heads: int, device) -> float:
    """The engine's paged prompt kernel, its default launch, keys in a paged cache."""
    blocks = keys // BLOCK
    k_cache = torch.randn(blocks, BLOCK, kv_heads, DIM, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(queries, HEADS, DIM, device=device, dtype=torch.bfloat16)
    batch = paged_batch([queries], [keys], device, blocks)
    return bench(lambda: paged_attention_from_cache(q, k_cache, v_cache, batch, DIM**-0.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    device = torch.device("cuda")
    results = {}
    for name in args.cases:
        queries, keys, kv_heads = CASES[name]
        flops = causal_flops(queries, keys)
        seconds = {"mii": mii_seconds(queries, keys, kv_heads, device)}
        seconds.update(peers(queries, keys, device))
        results[name] = {
            arm: {"us": round(s * 1e6, 1), "tflops": round(flops / s / 1e12)}
            for arm, s in seconds.items()
        }
        print(name, json.dumps(results[name]), flush=True)
        torch.cuda.empty_cache()
    write_json(args.json, {"benchmark": "attention_peers", **environment(), "cases": results})


if __name__ == "__main__":
    main()
