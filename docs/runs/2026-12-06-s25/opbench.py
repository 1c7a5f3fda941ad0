"""Twenty-fifth session, call 5: the attention op as models call it (rotary, cache write,
attention) on the last 4,096-query chunk of a 32k prompt, 32 / 8 heads, with
MII_PROMPT_ATTENTION=triton and =library alternated; then the library path's parts."""

import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.kernel_times import bench, paged_batch

from mii.ops import library_attention as la
from mii.ops.paged_attention import rotary_paged_attention

dev = torch.device("cuda")
Q, K, HQ, HKV, D, BS = 4096, 32768, 32, 8, 128, 16
blocks = K // BS
kc = torch.randn(blocks, BS, HKV, D, device=dev, dtype=torch.bfloat16)
vc = torch.randn_like(kc)
q0 = torch.randn(Q, HQ, D, device=dev, dtype=torch.bfloat16)
k = torch.randn(Q, HKV, D, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
batch = paged_batch([Q], [K], dev, blocks)
batch.slot_mapping = torch.arange(K - Q, K, device=dev)
pos = torch.arange(K - Q, K, device=dev)
for choice in ("triton", "library", "triton", "library"):
    os.environ["MII_PROMPT_ATTENTION"] = choice
    print(choice, la.library_members(batch, kc, None))
    t = bench(lambda: rotary_paged_attention(q0.clone(), k, v, pos, None, kc, vc, batch, D**-0.5))
    print(choice, round(t * 1e6, 1), "us")
k_seq, v_seq = la.gather_keys(kc, vc, batch.block_tables[0], K)
print("gather", round(bench(lambda: la.gather_keys(kc, vc, batch.block_tables[0], K)) * 1e6, 1))
t = bench(lambda: la.chunk_attention(q0, k_seq, v_seq, D**-0.5))
print("chunk_attention", round(t * 1e6, 1))
