"""Twenty-seventh session, call 4: what a new chunk shape costs the library prompt
attention (ops/library_attention.py) in a fresh process, with torch's bounded cuDNN
plans (TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, which the library path now sets) or without
(run with it set to 0): 12 serving-like chunk shapes (1,024-4,096 queries after 0-28k
cached keys, Llama-3-8B's 32 / 8 heads of 128), each called twice, timed; and the
output against float32 attention for three of them."""

import os
import random
import time

import torch

from mii.ops import library_attention as la

os.environ.setdefault(la.BOUNDED_PLANS_ENV, "1")  # as library_members does
dev = torch.device("cuda")
HQ, HKV, D = 32, 8, 128
rng = random.Random(0)
shapes = [(rng.randint(1024, 4096), rng.choice([0, rng.randint(1, 28_000)])) for _ in range(12)]


def timed(*operands):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = la.chunk_attention(*operands, D**-0.5)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def reference(q, k, v):
    """float32 causal attention of the last len(q) of k / v's keys."""
    group = HQ // HKV
    kf, vf = (x.float().repeat_interleave(group, dim=1).transpose(0, 1) for x in (k, v))
    scores = torch.matmul(q.float().transpose(0, 1), kf.transpose(1, 2)) * D**-0.5
    cached = k.shape[0] - q.shape[0]
    keys = torch.arange(k.shape[0], device=dev)
    mask = keys[None, :] > (cached + torch.arange(q.shape[0], device=dev))[:, None]
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), vf).transpose(0, 1)


print(f"{la.BOUNDED_PLANS_ENV}={os.environ[la.BOUNDED_PLANS_ENV]}", torch.cuda.get_device_name())
total_first = total_second = 0.0
for i, (queries, cached) in enumerate(shapes):
    # q as models pass it: a view into the qkv projection's output
    qkv = torch.randn(queries, (HQ + 2 * HKV) * D, device=dev, dtype=torch.bfloat16)
    q = qkv[:, : HQ * D].view(queries, HQ, D)
    k = torch.randn(cached + queries, HKV, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out, first = timed(q, k, v)
    _, second = timed(q, k, v)
    total_first, total_second = total_first + first, total_second + second
    line = f"{queries:5d} queries after {cached:6d} keys: first {first * 1e3:8.1f} ms, "
    line += f"again {second * 1e3:6.2f} ms"
    if i < 3 and cached + queries <= 12_000:
        err = (out.float() - reference(q, k, v)).abs().max().item()
        line += f", max |error| vs float32 {err:.4f}"
    print(line, flush=True)
print(f"all first calls {total_first:.2f} s, all second calls {total_second:.3f} s")
