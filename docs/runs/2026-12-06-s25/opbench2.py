"""Twenty-fifth session, call 6: does cuDNN's SDPA take grouped-query keys as they are
(no repeat)? Output and log-sum-exp vs the repeated keys', and times."""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from benchmarks.kernel_times import bench

dev = torch.device("cuda")
Q, K, HQ, HKV, D = 4096, 32768, 32, 8, 128
P = K - Q  # the cached keys before the chunk
q = torch.randn(1, HQ, Q, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, HKV, K, D, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
op = torch.ops.aten._scaled_dot_product_cudnn_attention


def prefix_call(keys, values):
    return op(q, keys, values, None, True, 0.0, False, False, scale=D**-0.5)


kr, vr = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
ref = prefix_call(kr[:, :, :P], vr[:, :, :P])
print("repeat", round(bench(lambda: k.repeat_interleave(4, dim=1)) * 1e6, 1), "us per tensor")
t = bench(lambda: prefix_call(kr[:, :, :P], vr[:, :, :P]))
print("repeated prefix call", round(t * 1e6, 1))
contiguous = (k[:, :, :P].contiguous(), v[:, :, :P].contiguous())
for name, keys, values in (("gqa", k[:, :, :P], v[:, :, :P]), ("gqa-contig-slice", *contiguous)):
    try:
        out = prefix_call(keys, values)
        err = (out[0].float() - ref[0].float()).abs().max().item()
        lse_err = (out[1].float().reshape(-1) - ref[1].float().reshape(-1)).abs().max().item()
        t = bench(lambda keys=keys, values=values: prefix_call(keys, values))
        print(name, "max err", err, "lse err", lse_err, round(t * 1e6, 1), "us")
    except Exception as e:
        print(name, "failed:", str(e).splitlines()[0][:200])
try:
    t = bench(lambda: F.scaled_dot_product_attention(q, k[:, :, :P], v[:, :, :P], enable_gqa=True))
    print("F.sdpa enable_gqa (backend chosen by torch)", round(t * 1e6, 1))
except Exception as e:
    print("enable_gqa failed:", str(e).splitlines()[0][:200])
