# Does cuDNN's SDPA take grouped-query keys as they are (no repeat)? Output vs the
# repeated keys' and time; then the merged chunk without the repeat.
import os, sys, torch
sys.path.insert(0, os.getcwd())
from benchmarks.kernel_times import bench
dev = torch.device("cuda")
Q, K, HQ, HKV, D = 4096, 32768, 32, 8, 128
q = torch.randn(1, HQ, Q, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, HKV, K, D, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
op = torch.ops.aten._scaled_dot_product_cudnn_attention
kr, vr = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
ref = op(q, kr[:, :, :K-Q], vr[:, :, :K-Q], None, True, 0.0, False, False, scale=D**-0.5)
print("repeat", round(bench(lambda: k.repeat_interleave(4, dim=1)) * 1e6, 1), "us per tensor")
print("repeated prefix call", round(bench(lambda: op(q, kr[:, :, :K-Q], vr[:, :, :K-Q], None, True, 0.0, False, False, scale=D**-0.5)) * 1e6, 1))
for name, kk, vv in (("gqa", k, v), ("gqa-contig-slice", k[:, :, :K-Q].contiguous(), v[:, :, :K-Q].contiguous())):
    try:
        kk2, vv2 = (kk[:, :, :K-Q], vv[:, :, :K-Q]) if name == "gqa" else (kk, vv)
        out = op(q, kk2, vv2, None, True, 0.0, False, False, scale=D**-0.5)
        err = (out[0].float() - ref[0].float()).abs().max().item()
        lse_err = (out[1].float().reshape(-1) - ref[1].float().reshape(-1)).abs().max().item()
        t = bench(lambda: op(q, kk2, vv2, None, True, 0.0, False, False, scale=D**-0.5))
        print(name, "max err", err, "lse err", lse_err, round(t * 1e6, 1), "us")
    except Exception as e:
        print(name, "failed:", str(e).splitlines()[0][:200])
try:
    import torch.nn.functional as F
    t = bench(lambda: F.scaled_dot_product_attention(q, k[:, :, :K-Q], v[:, :, :K-Q], enable_gqa=True))
    print("F.sdpa enable_gqa (backend chosen by torch)", round(t * 1e6, 1))
except Exception as e:
    print("enable_gqa failed:", str(e).splitlines()[0][:200])
