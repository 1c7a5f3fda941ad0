"""The fp8 KV cache (``kv_cache_dtype="fp8"``): the Triton kernels write and read
it as the torch reference does (CPU: interpreted), values saturate instead of
overflowing, the pool holds more tokens, and the engine serves from it."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import mii
from helpers import PROMPTS, TIGHT_OPTIONS
from mii.ops import triton_attention
from mii.ops.attention import FP8_KV_DTYPE, rotary_paged_attention_reference, to_cache
from mii.ops.rotary import apply_rotary_reference
from mii.ops.triton_attention import (
    _e4m3_bits_to_f16,
    paged_attention_from_cache,
    paged_attention_triton,
)
from test_triton_kernels import CASES, DEVICE, make_case, to_device


def fp8_case(index: int, dtype: torch.dtype):
    """CASES[index] (cached context + new tokens per sequence) with its caches in fp8."""
    shapes, hq, hkv, dim, block, window, rot = CASES[index]
    case = list(make_case(shapes, hq, hkv, dim, block, dtype, rot, index))
    case[5] = to_cache(case[5], FP8_KV_DTYPE)
    case[6] = to_cache(case[6], FP8_KV_DTYPE)
    return case, dim, window


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", [0, 2, 4])  # GQA + rotary, MQA + window, no rotary
def test_triton_fp8_cache_matches_reference(index, dtype):
    case, dim, window = fp8_case(index, dtype)
    ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch = case
    expected = rotary_paged_attention_reference(
        ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch, dim**-0.5, window
    )
    q, k, v, pos_d, cs_d, kc, vc, batch = to_device(fp8_case(index, dtype)[0])
    out = paged_attention_triton(q, k, v, pos_d, cs_d, kc, vc, batch, dim**-0.5, window)
    # Writing: values are copied exactly; both paths round rotated keys to fp8 from
    # float32, so a key may differ only where float32 rounding differs at an fp8
    # midpoint: at most one fp8 step (1/8 relative), and rarely.
    assert kc.dtype == vc.dtype == FP8_KV_DTYPE
    assert torch.equal(vc.float().cpu(), ref_vc.float())  # as values: -0.0 == 0.0
    key_error = (kc.float().cpu() - ref_kc.float()).abs() / ref_kc.float().abs().clamp(min=1e-2)
    assert key_error.max() <= 0.125 + 1e-6
    assert (key_error > 0).float().mean() < 0.01
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    # Reading: the attention kernel over the reference's own fp8 caches.
    rotated_q = apply_rotary_reference(ref_q, pos, cs) if cs is not None else ref_q
    read = paged_attention_from_cache(
        rotated_q.to(DEVICE), ref_kc.to(DEVICE), ref_vc.to(DEVICE), batch, dim**-0.5, window
    )
    torch.testing.assert_close(read.float().cpu(), expected.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=tol, atol=tol)


def test_out_of_range_values_saturate():
    x = torch.tensor([[[1000.0, -1000.0, 3.3, 448.0]]])
    cached = to_cache(x, FP8_KV_DTYPE).float()
    assert cached.flatten().tolist() == [448.0, -448.0, 3.25, 448.0]
    case, dim, _ = fp8_case(4, torch.float32)  # no rotary: keys are copied as given
    q, k, v, pos, cs, kc, vc, batch = to_device(case)
    k[0, 0, 0], v[0, 0, 0] = 1e4, -1e4
    paged_attention_triton(q, k, v, pos, cs, kc, vc, batch, dim**-0.5, None)
    slot = int(batch.slot_mapping[0])
    flat_k, flat_v = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])
    assert flat_k[slot, 0, 0].float().item() == 448.0
    assert flat_v[slot, 0, 0].float().item() == -448.0
    assert not torch.isnan(kc.float()).any()


def test_fp8_pool_holds_more_blocks(checkpoints):
    """Same bytes, one byte per element: 4x the blocks of float32, 2x of bf16."""
    from mii.engine.kv_cache import choose_num_blocks
    from mii.models.base import KVCacheSpec

    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=32)
    sizes = {
        dtype: choose_num_blocks(
            spec,
            16,
            dtype,
            torch.device("cpu"),
            requested=None,
            memory_fraction=0.85,
            cpu_bytes=1 << 22,
            max_length=64,
            max_num_seqs=100_000,
        )
        for dtype in (torch.float32, torch.bfloat16, FP8_KV_DTYPE)
    }
    assert sizes[FP8_KV_DTYPE] == 2 * sizes[torch.bfloat16] == 4 * sizes[torch.float32]


def test_engine_serves_from_an_fp8_cache(checkpoints):
    """The engine allocates fp8 caches and gives the same greedy tokens whether
    prompts are chunked and preempted or not."""
    path, _ = checkpoints("llama")
    outputs = {}
    for name, options in {"fp8": {}, "fp8-tight": TIGHT_OPTIONS}.items():
        with mii.pipeline(str(path), kv_cache_dtype="fp8", **options) as pipe:
            caches = pipe.engine.core.runner.kv_caches
            assert all(k.dtype == v.dtype == FP8_KV_DTYPE for k, v in caches)
            responses = pipe(PROMPTS, do_sample=False, max_new_tokens=16, ignore_eos=True)
            outputs[name] = [r.token_ids for r in responses]
            stats = pipe.engine.stats()
            # as the deployment's start-up line reports it (stats_log.capacity_line)
            assert stats["kv_cache_dtype"] == "fp8" and stats["quantization"] == "none"
        if name == "fp8-tight":
            assert stats["preemptions"] > 0
    assert all(len(tokens) == 16 for tokens in outputs["fp8"])
    assert outputs["fp8-tight"] == outputs["fp8"]


def test_bad_kv_cache_dtype_is_refused(checkpoints):
    path, _ = checkpoints("llama")
    with pytest.raises(mii.InvalidRequestError, match="kv_cache_dtype"):
        mii.pipeline(str(path), kv_cache_dtype="int4")


@triton.jit
def _decode_e4m3_bits(Bits, Out):
    offs = tl.arange(0, 256)
    tl.store(Out + offs, _e4m3_bits_to_f16(tl.load(Bits + offs)))


def test_e4m3_bit_patterns_decode_to_their_float16_values():
    """MII_FP8_KV_VALUES=pairs decodes each value byte by moving its fields into a
    float16's: every finite e4m3 pattern (subnormals, zeros of both signs, +-448)
    gives torch's float8 -> float16 conversion exactly."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint16).to(DEVICE)
    out = torch.empty(256, dtype=torch.float16, device=DEVICE)
    _decode_e4m3_bits[(1,)](bits, out)
    expected = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_KV_DTYPE).half()
    finite = ~expected.isnan()
    assert finite.sum() == 254
    assert torch.equal(out.cpu()[finite].view(torch.int16), expected[finite].view(torch.int16))


@pytest.mark.parametrize("index", range(len(CASES)))
def test_value_pairs_read_the_same_attention(index, monkeypatch):
    """Attention over an fp8 cache (bf16 queries: computed in float16) reads the
    values as 16-bit pairs with MII_FP8_KV_VALUES=pairs: the same outputs as reading
    them as bytes, over caches holding every finite e4m3 bit pattern, for decode and
    prompt tiles, a padded head (24 of 32 columns),
    windows and grouped queries. The products are the same; the interpreter's two
    half-width matmuls may round a float32 sum differently, which can move a bf16
    output by one step (3 of 24,448 elements in one case), hence one bf16 step of
    tolerance: a mis-decoded or misplaced value moves outputs far more."""
    case, dim, window = fp8_case(index, torch.bfloat16)
    q, _, _, pos, cs, kc, vc, _ = case
    gen = torch.Generator().manual_seed(index)
    patterns = torch.randint(0, 254, vc.shape, generator=gen, dtype=torch.int32)
    patterns = patterns + (patterns >= 0x7F).int()  # skip 0x7F and 0xFF (NaN)
    vc = patterns.to(torch.uint8).view(FP8_KV_DTYPE)
    rotated_q = apply_rotary_reference(q, pos, cs) if cs is not None else q
    args = (rotated_q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE))
    batch = to_device(case)[-1]
    outputs = {}
    for choice in ("bytes", "pairs"):
        monkeypatch.setenv("MII_FP8_KV_VALUES", choice)
        outputs[choice] = paged_attention_from_cache(*args, batch, dim**-0.5, window)
    assert outputs["bytes"].abs().max() > 1.0  # the values reached the output
    pairs, as_bytes = outputs["pairs"].float(), outputs["bytes"].float()
    torch.testing.assert_close(pairs, as_bytes, rtol=2**-7, atol=1e-6)
    assert (pairs != as_bytes).float().mean() < 1e-3


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dim", [32, 24])  # 24: a padded head
def test_one_query_decodes_on_cuda_cores_match_reference(dim, splits, window, monkeypatch):
    """MII_DECODE_ONE_QUERY=cores: one-head decode programs on an fp8 cache take a
    decode's query on the CUDA cores in float32 (a chunk of a few queries in the same
    launch keeps the 16-row products): the reference's attention within bf16
    tolerance, split-KV and sliding windows included (the interpreter computes the
    'dot' path in float32 too, so the two agree here; the launch is checked to ask
    for the CUDA-core path)."""
    shapes = [(40, 1), (0, 5), (7, 1), (130, 1), (3, 4), (64, 1)]
    case = list(make_case(shapes, 4, 4, dim, 8, torch.bfloat16, dim, seed=dim + splits))
    case[5], case[6] = to_cache(case[5], FP8_KV_DTYPE), to_cache(case[6], FP8_KV_DTYPE)
    ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch = case
    expected = rotary_paged_attention_reference(
        ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch, dim**-0.5, window
    )
    rotated_q = apply_rotary_reference(ref_q, pos, cs).to(DEVICE)
    batch = to_device(case)[-1]
    kernel = triton_attention._paged_attention_kernel
    asked = []

    class Spy:  # records each launch's ONE_QUERY, then launches
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                asked.append((kwargs["BLOCK_M"], kwargs["ONE_QUERY"] > 0))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_attention, "_paged_attention_kernel", Spy())
    for choice in ("dot", "cores"):
        monkeypatch.setenv("MII_DECODE_ONE_QUERY", choice)
        asked.clear()
        out = paged_attention_from_cache(
            rotated_q, ref_kc.to(DEVICE), ref_vc.to(DEVICE), batch, dim**-0.5, window, splits
        )
        torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=2e-2, atol=2e-2)
        assert asked == [(16, choice == "cores")]  # one launch: every chunk fits 16


@pytest.mark.parametrize("many", [True, False])
@pytest.mark.parametrize("unsplit_launch", ["narrow", "wide"])
@pytest.mark.parametrize("splits", [1, 3])
def test_one_query_decodes_take_their_launch_by_split(splits, unsplit_launch, many, monkeypatch):
    """The CUDA-core decode programs launch with 16 keys a step on 2 warps when they
    are many per multiprocessor and unsplit and MII_ONE_QUERY_UNSPLIT_LAUNCH=narrow, and
    with the split-KV launch (32 keys, 4 warps) when split, few, or 'wide' (the
    default); the numbers are the reference's either way. (12 programs here: 'many'
    lowers the threshold.)"""
    if many:
        monkeypatch.setattr(triton_attention, "ONE_QUERY_NARROW_MIN_PER_SM", 0)
    shapes = [(40, 1), (7, 1), (130, 1)]
    case = list(make_case(shapes, 4, 4, 32, 8, torch.bfloat16, 32, seed=splits))
    case[5], case[6] = to_cache(case[5], FP8_KV_DTYPE), to_cache(case[6], FP8_KV_DTYPE)
    ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch = case
    expected = rotary_paged_attention_reference(
        ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch, 32**-0.5, None
    )
    rotated_q = apply_rotary_reference(ref_q, pos, cs).to(DEVICE)
    kernel = triton_attention._paged_attention_kernel
    asked = []

    class Spy:  # records each launch's keys a step and warps, then launches
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                asked.append((kwargs["BLOCK_N"], kwargs["num_warps"]))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_attention, "_paged_attention_kernel", Spy())
    monkeypatch.setenv("MII_DECODE_ONE_QUERY", "cores")
    monkeypatch.setenv("MII_ONE_QUERY_UNSPLIT_LAUNCH", unsplit_launch)
    out = paged_attention_from_cache(
        rotated_q,
        ref_kc.to(DEVICE),
        ref_vc.to(DEVICE),
        to_device(case)[-1],
        32**-0.5,
        None,
        splits,
    )
    torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=2e-2, atol=2e-2)
    narrow = splits == 1 and unsplit_launch == "narrow" and many
    assert asked == [(16, 2) if narrow else (32, 4)]
