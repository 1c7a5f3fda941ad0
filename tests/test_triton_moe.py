"""The grouped expert kernel against the torch expert loop and a per-token
definition, on CPU under TRITON_INTERPRET=1, set by conftest (and on the GPU when there is one)."""

from __future__ import annotations

import pytest
import torch

from mii.models.moe import grouped_kernel_enabled
from mii.ops.dispatch import fused_kernels_enabled
from mii.ops.triton_moe import align_by_expert, align_by_expert_torch, moe_grouped_mlp
from test_family_mixtral import (
    CHECKPOINTS,
    TIGHT_OPTIONS,
    assert_matches_hf,
    moe_checkpoints,  # noqa: F401 (a fixture)
    per_token_reference,
    random_moe,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("tokens", "top_k", "num_experts", "block_m"),
    [(1, 2, 8, 16), (5, 1, 3, 16), (37, 2, 6, 16), (300, 2, 8, 64), (4, 2, 60, 16)],
)
def test_layout_groups_every_pair_by_expert(tokens, top_k, num_experts, block_m):
    generator = torch.Generator().manual_seed(tokens)
    scores = torch.rand(tokens, num_experts, generator=generator)
    experts = scores.topk(top_k, dim=-1).indices.to(DEVICE)
    sorted_pairs, block_expert = align_by_expert(experts, num_experts, block_m)
    num_pairs = tokens * top_k
    pairs, owners = sorted_pairs.cpu(), block_expert.cpu()
    assert pairs.numel() == owners.numel() * block_m
    valid = pairs[pairs < num_pairs]
    assert sorted(valid.tolist()) == list(range(num_pairs))  # each pair exactly once
    flat = experts.reshape(-1).cpu()
    used = owners[owners >= 0]
    assert torch.equal(used, used.sort().values)  # blocks in expert order
    assert (owners[used.numel() :] == -1).all()  # unused blocks only at the end
    for block, expert in enumerate(owners.tolist()):
        rows = pairs[block * block_m : (block + 1) * block_m]
        rows = rows[rows < num_pairs]
        if expert < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows.long()] == expert).all()


@pytest.mark.parametrize(
    ("tokens", "top_k", "num_experts", "block_m", "skew"),
    [
        (1, 2, 8, 16, None),
        (3, 1, 3, 16, None),  # experts not a power of two; some empty
        (1500, 2, 8, 128, None),  # 3,000 pairs: several chunks of the kernel's loops
        (700, 4, 60, 16, None),  # many experts: narrower chunks
        (900, 2, 8, 64, 5),  # every pair on one expert, the others empty
        (0, 2, 8, 16, None),  # an empty batch
    ],
)
def test_one_launch_layout_equals_the_torch_one(tokens, top_k, num_experts, block_m, skew):
    """The alignment kernel gives exactly the torch operations' layout (pair order
    kept within each expert, the same padding and block owners)."""
    generator = torch.Generator().manual_seed(tokens + num_experts)
    if skew is None:
        scores = torch.rand(tokens, num_experts, generator=generator)
        experts = scores.topk(top_k, dim=-1).indices
    else:
        experts = torch.full((tokens, top_k), skew, dtype=torch.long)
    experts = experts.to(DEVICE)
    got = align_by_expert(experts, num_experts, block_m)
    expected = align_by_expert_torch(experts, num_experts, block_m)
    for got_part, expected_part in zip(got, expected, strict=True):
        assert got_part.dtype == expected_part.dtype == torch.int32
        assert torch.equal(got_part.cpu(), expected_part.cpu())


def test_layout_of_host_tensors_without_the_interpreter(monkeypatch):
    """A CPU tensor on a machine that compiles Triton for its GPU (not interpreted):
    the torch operations lay it out (the kernel could not read it)."""
    import mii.ops.triton_moe as kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(kernels, "_align_kernel", None)  # any launch would fail
    experts = torch.tensor([[1, 0], [1, 1]])
    pairs, blocks = align_by_expert(experts, 2, 16)
    assert pairs[:2].tolist() == [1, 4] and pairs[16:19].tolist() == [0, 2, 3]
    assert blocks.tolist()[:2] == [0, 1]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    ("tokens", "sizes"),
    [
        (1, {}),
        (3, {"top_k": 1}),
        (37, {}),
        (300, {"num_experts": 4}),  # prompt-sized: the larger row block
        (9, {"hidden_size": 80, "intermediate_size": 72}),  # K over several tiles, masked
    ],
)
def test_grouped_mlp_matches_reference(renormalize, tokens, sizes):
    moe = random_moe(renormalize, **sizes).to(DEVICE)
    x = torch.randn(tokens, moe.gate.in_features, generator=torch.Generator().manual_seed(4))
    x = x.to(DEVICE)
    with torch.no_grad():
        weights, experts = moe.route(x)
        got = moe_grouped_mlp(x, moe.w13, moe.w2, weights, experts, moe.act)
        torch.testing.assert_close(
            got, moe.forward_torch(x, weights, experts), rtol=1e-4, atol=1e-4
        )
        if tokens < 50:
            expected = per_token_reference(moe.cpu(), x.cpu())
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_grouped_mlp_in_bfloat16():
    moe = random_moe(True, hidden_size=64, intermediate_size=32).to(DEVICE)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        expected = moe.forward_torch(x, *moe.route(x))
        moe = moe.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        weights, experts = moe.route(xb)
        got = moe_grouped_mlp(xb, moe.w13, moe.w2, weights, experts, moe.act)
    assert got.dtype == torch.bfloat16
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() < 0.03 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_activation_gives_the_same_numbers(dtype):
    """``fused_activation``: act(gate) * up in one launch of the fused kernel, the
    same values as the activation's torch function (bit-equal in bf16 here: both
    round the activation, then the product, to the dtype)."""
    moe = random_moe(True, hidden_size=64, intermediate_size=48).to(DEVICE).to(dtype)
    x = torch.randn(13, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE).to(dtype)
    with torch.no_grad():
        weights, experts = moe.route(x)
        plain = moe_grouped_mlp(x, moe.w13, moe.w2, weights, experts, moe.act)
        fused = moe_grouped_mlp(
            x, moe.w13, moe.w2, weights, experts, moe.act, fused_activation="silu"
        )
    if dtype == torch.bfloat16:
        assert torch.equal(fused, plain)
    else:  # the kernel's exp is not torch's: float32's defaults, as act_and_mul's own test
        torch.testing.assert_close(fused, plain)


def test_layer_uses_kernel_when_asked(monkeypatch):
    moe = random_moe(True).to(DEVICE)
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    calls = []
    import mii.ops.triton_moe as kernels

    original = kernels.moe_grouped_mlp
    monkeypatch.setattr(
        kernels, "moe_grouped_mlp", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    with torch.no_grad():
        monkeypatch.setenv("MII_MOE", "torch")
        looped = moe(x)
        assert not calls
        monkeypatch.setenv("MII_MOE", "triton")
        grouped = moe(x)
        assert calls
    torch.testing.assert_close(grouped, looped, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("variable", "enabled"),
    [("MII_MOE", grouped_kernel_enabled), ("MII_FUSED", fused_kernels_enabled)],
)
def test_kernel_choice(monkeypatch, variable, enabled):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(variable, raising=False)
    assert enabled(cuda) and not enabled(cpu)
    monkeypatch.setenv(variable, "torch")
    assert not enabled(cuda)
    monkeypatch.setenv(variable, "triton")
    assert enabled(cpu)
    monkeypatch.setenv(variable, "fused")
    with pytest.raises(ValueError, match=f"{variable} must be"):
        enabled(cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernel")
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_engine_with_grouped_kernel_matches_hf(moe_checkpoints, tokenizer, name, monkeypatch):  # noqa: F811
    """Whole models through the interpreted kernel (what CUDA runs by default),
    with chunked prompts and preemption: greedy tokens equal transformers'."""
    monkeypatch.setenv("MII_MOE", "triton")
    path, hf_model = moe_checkpoints(name)
    assert_matches_hf(path, hf_model, tokenizer, **TIGHT_OPTIONS, expect_preemption=True)


def test_pipeline_stages_fit_shared_memory(monkeypatch):
    """The measured bf16 defaults keep their stages; fp32 (twice the bytes) gets
    fewer, and so does a GPU with less shared memory per program (an L4's 99 KB)."""
    from mii.ops import triton_limits
    from mii.ops.triton_moe import TileConfig, default_tiles, stages_that_fit

    cpu = torch.device("cpu")
    for pairs in (2, 32, 256, 8192):
        tiles = default_tiles(pairs)
        assert stages_that_fit(tiles, tiles.block_k, 2, cpu) == tiles.num_stages
        fp32 = stages_that_fit(tiles, tiles.block_k, 4, cpu)
        assert 1 <= fp32 <= tiles.num_stages
        assert (tiles.block_m + tiles.block_n) * tiles.block_k * 4 * fp32 <= 160 * 1024
    assert stages_that_fit(TileConfig(128, 256, 64, 8, 3), 64, 4, cpu) == 1
    monkeypatch.setattr(triton_limits, "INTERPRETED", False)
    monkeypatch.setattr(triton_limits, "_shared_memory_per_program", lambda index: 101_376)
    small = torch.device("cuda", 0)
    tiles = TileConfig(16, 64, 256, num_warps=4, num_stages=4)  # 40 KB per bf16 stage
    assert stages_that_fit(tiles, 256, 2, small) == 2  # (101,376 - 8 KB) // 40 KB
