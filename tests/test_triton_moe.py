"""The grouped expert kernel against the torch expert loop and a per-token
definition, on CPU under TRITON_INTERPRET=1, set by conftest (and on the GPU when there is one)."""

from __future__ import annotations

import pytest
import torch

from mii.models.moe import grouped_kernel_enabled
from mii.ops.dispatch import fused_kernels_enabled
from mii.ops.triton_moe import moe_grouped_mlp
from mii.ops.triton_moe_layout import align_by_expert, align_by_expert_torch, route_and_align
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
        (300, 8, 256, 64, None),  # DeepSeek-like: 256 experts, top 8 (32-pair chunks)
        (50, 2, 60, 16, 59),  # only the last expert of a count not a power of two
        (0, 2, 8, 16, None),  # an empty batch
    ],
)
def test_one_launch_layout_equals_the_torch_one(
    monkeypatch, tokens, top_k, num_experts, block_m, skew
):
    """The alignment kernel gives exactly the torch operations' layout (pair order
    kept within each expert, the same padding and block owners), at every size
    (its limit raised: past it the layout is the torch one by construction)."""
    import mii.ops.triton_moe_layout as layout

    monkeypatch.setattr(layout, "ONE_PROGRAM_LAYOUT_MAX", 1 << 30)
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


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    ("tokens", "num_experts", "top_k", "block_m", "dtype"),
    [
        (1, 8, 2, 16, torch.bfloat16),  # Mixtral decode
        (37, 8, 2, 64, torch.float32),
        # Qwen2-MoE-like: 60 experts, several chunks (float32 logits: bf16 ones of 60
        # experts tie at the k-th place, where torch.topk's choice is its own)
        (300, 60, 4, 16, torch.float32),
        (64, 8, 2, 16, torch.bfloat16),
        (5, 3, 1, 16, torch.float32),
        (0, 8, 2, 16, torch.float32),
    ],
)
def test_routing_in_one_launch_equals_route_and_layout(
    renormalize, tokens, num_experts, top_k, block_m, dtype
):
    """``route_and_align``: SparseMoE.route's experts and weights (softmax in float32,
    top-k, renormalised or not) and align_by_expert's layout of them, from one launch."""
    moe = random_moe(renormalize, num_experts=num_experts, top_k=top_k, hidden_size=32)
    moe = moe.to(DEVICE).to(dtype)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens)).to(DEVICE)
    with torch.no_grad():
        logits = moe.gate(x.to(dtype))
        weights, experts = moe.route(x.to(dtype))
    if not moe.float32_combine:
        weights = weights.float()
    got_weights, got_experts, pairs, blocks = route_and_align(logits, top_k, renormalize, block_m)
    # The same (expert, weight) pairs per token; among equal probabilities (bf16
    # logits tie) torch.topk's order is its own, so each row is compared by expert.
    got_order, order = got_experts.long().cpu().sort(dim=-1), experts.cpu().sort(dim=-1)
    assert torch.equal(got_order.values, order.values)
    torch.testing.assert_close(
        got_weights.cpu().gather(1, got_order.indices),
        weights.float().cpu().gather(1, order.indices),
        rtol=1e-6,
        atol=1e-7,
    )
    untied = (weights.float().cpu().diff(dim=-1) != 0).all(dim=-1)  # rows without ties
    assert torch.equal(got_experts.long().cpu()[untied], experts.cpu()[untied])
    expected_pairs, expected_blocks = align_by_expert_torch(got_experts, num_experts, block_m)
    assert torch.equal(pairs.cpu(), expected_pairs.cpu())
    assert torch.equal(blocks.cpu(), expected_blocks.cpu())


def test_routing_ties_go_to_the_lower_expert():
    logits = torch.zeros(3, 6, device=DEVICE)
    logits[1, 4] = logits[1, 5] = 1.0
    weights, experts, _, _ = route_and_align(logits, 2, True, 16)
    assert experts.cpu().tolist() == [[0, 1], [4, 5], [0, 1]]
    assert torch.equal(weights.cpu(), torch.full((3, 2), 0.5))


@pytest.mark.parametrize(("renormalize", "float32_combine"), [(True, True), (False, False)])
def test_layer_with_fused_routing_equals_the_torch_routing(
    monkeypatch, renormalize, float32_combine
):
    """MII_MOE_ROUTING=fused: the layer's output is the one of torch routing plus the
    layout kernel (Mixtral's float32 combine; Qwen2-MoE's weights in the model dtype)."""
    moe = random_moe(renormalize, num_experts=6, top_k=2).to(DEVICE).to(torch.bfloat16)
    moe.float32_combine = float32_combine
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    x = x.to(torch.bfloat16)
    monkeypatch.setenv("MII_MOE", "triton")
    with torch.no_grad():
        monkeypatch.setenv("MII_MOE_ROUTING", "torch")
        unfused = moe(x)
        monkeypatch.setenv("MII_MOE_ROUTING", "fused")
        fused = moe(x)
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("group_m", [2, 3, 8])
def test_l2_program_order_gives_the_same_output(group_m):
    """``TileConfig.group_m``: programs in groups of row blocks down the columns
    (a 1-D grid, the last group shorter) compute exactly what the 2-D grid does;
    on a layout of only real row blocks, so the last group's blocks all count."""
    from mii.ops.triton_moe import TileConfig, grouped_gemm

    generator = torch.Generator().manual_seed(group_m)
    experts = torch.randint(0, 4, (61, 1), generator=generator).to(DEVICE)
    a = torch.randn(61, 64, generator=generator).to(DEVICE)
    weight = torch.randn(4, 80, 64, generator=generator).to(DEVICE)
    tiles = TileConfig(16, 32, 32)
    pairs, blocks = align_by_expert(experts, 4, tiles.block_m)
    used = int((blocks >= 0).sum())
    assert used % group_m != 0 or group_m == 2  # a shorter last group
    pairs, blocks = pairs[: used * tiles.block_m], blocks[:used]
    args = (a, weight, pairs, blocks, 61, 1)
    plain = grouped_gemm(*args, tiles)
    grouped = grouped_gemm(*args, tiles._replace(group_m=group_m))
    assert torch.equal(grouped, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_tiles_give_the_same_output(dtype):
    """``TileConfig.swap_ab`` (the product computed transposed) on 16-bit and float32
    experts: the same output, within the sums' order (several experts per launch, N
    and K not multiples of the blocks)."""
    from mii.ops.triton_moe import TileConfig, grouped_gemm

    generator = torch.Generator().manual_seed(5)
    experts = torch.randint(0, 4, (23, 1), generator=generator).to(DEVICE)
    a = torch.randn(23, 72, generator=generator).to(dtype).to(DEVICE)
    weight = torch.randn(4, 80, 72, generator=generator).to(dtype).to(DEVICE)
    tiles = TileConfig(16, 32, 32)
    pairs, blocks = align_by_expert(experts, 4, tiles.block_m)
    args = (a, weight, pairs, blocks, 23, 1)
    plain = grouped_gemm(*args, tiles)
    swapped = grouped_gemm(*args, tiles._replace(swap_ab=True))
    torch.testing.assert_close(swapped, plain, rtol=1e-5, atol=1e-5)
    expected = torch.einsum("tk,tnk->tn", a.float(), weight[experts[:, 0]].float())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(swapped.float(), expected, rtol=tolerance, atol=tolerance)


def test_large_layouts_keep_the_torch_operations(monkeypatch):
    """One program lays out Mixtral's passes and small decode batches of many
    experts; a 256-expert top-8 prompt pass (its loops would run ~1,000 steps on
    one multiprocessor) takes the torch operations."""
    import mii.ops.triton_moe_layout as layout

    assert layout.one_program_layout(4096 * 2, 8)  # Mixtral, a 4,096-token pass
    assert layout.one_program_layout(256 * 2, 8)  # Mixtral, 256 decoding sequences
    assert layout.one_program_layout(64 * 8, 256)  # 256 experts, 64 decoding sequences
    assert not layout.one_program_layout(4096 * 8, 256)
    monkeypatch.setattr(layout, "_align_kernel", None)  # any launch would fail
    experts = torch.randint(0, 256, (4096, 8), generator=torch.Generator().manual_seed(1))
    got = align_by_expert(experts.to(DEVICE), 256, 64)
    expected = align_by_expert_torch(experts.to(DEVICE), 256, 64)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_layout_of_host_tensors_without_the_interpreter(monkeypatch):
    """A CPU tensor on a machine that compiles Triton for its GPU (not interpreted):
    the torch operations lay it out (the kernel could not read it)."""
    import mii.ops.triton_moe_layout as layout

    monkeypatch.setattr(layout, "INTERPRETED", False)
    monkeypatch.setattr(layout, "_align_kernel", None)  # any launch would fail
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


def test_down_projection_tiles_of_their_own():
    """``down_tiles``: narrower column blocks (and other K slices) for the down
    projection give the same output; a block_m other than the layout's is refused."""
    from mii.ops.triton_moe import TileConfig

    moe = random_moe(True, hidden_size=64, intermediate_size=48).to(DEVICE)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    tiles = TileConfig(16, 64, 32)
    with torch.no_grad():
        weights, experts = moe.route(x)
        same = moe_grouped_mlp(x, moe.w13, moe.w2, weights, experts, moe.act, tiles)
        narrow = moe_grouped_mlp(
            x, moe.w13, moe.w2, weights, experts, moe.act, tiles,
            down_tiles=TileConfig(16, 16, 64, num_stages=4),
        )  # fmt: skip
        torch.testing.assert_close(narrow, same, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"down_tiles\.block_m"):
            moe_grouped_mlp(
                x, moe.w13, moe.w2, weights, experts, moe.act, tiles,
                down_tiles=TileConfig(32, 16, 64),
            )  # fmt: skip


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
    """``fused_activation``: act(gate) * up in one launch of the fused kernel (the
    torch ``act`` is not called), the same values as the activation's torch function
    (bit-equal in bf16 here: both round the activation, then the product, to the dtype)."""
    moe = random_moe(True, hidden_size=64, intermediate_size=48).to(DEVICE).to(dtype)
    x = torch.randn(13, 64, generator=torch.Generator().manual_seed(8)).to(DEVICE).to(dtype)

    def unused(t: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the torch activation ran beside the fused kernel")

    with torch.no_grad():
        weights, experts = moe.route(x)
        plain = moe_grouped_mlp(x, moe.w13, moe.w2, weights, experts, moe.act)
        fused = moe_grouped_mlp(
            x, moe.w13, moe.w2, weights, experts, unused, fused_activation="silu"
        )
    if dtype == torch.bfloat16:
        assert torch.equal(fused, plain)
    else:  # the kernel's exp is not torch's: float32's defaults, as act_and_mul's own test
        torch.testing.assert_close(fused, plain)


@pytest.mark.parametrize(
    ("act", "fused_choice", "expected"),
    [("silu", "triton", "silu"), ("silu", "torch", None), ("relu", "triton", None)],
)
def test_layer_fuses_the_activation_it_can(monkeypatch, act, fused_choice, expected):
    """The layer hands the grouped kernel its activation's name where the fused
    kernels are on (``MII_FUSED``) and have that activation, None otherwise (the
    torch function then runs): the same outputs as the torch expert loop either way."""
    import mii.ops.triton_moe as kernels

    moe = random_moe(True, act=act).to(DEVICE)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    seen = []
    original = kernels.moe_grouped_mlp
    monkeypatch.setattr(
        kernels,
        "moe_grouped_mlp",
        lambda *a, **k: seen.append(k.get("fused_activation")) or original(*a, **k),
    )
    monkeypatch.setenv("MII_FUSED", fused_choice)
    with torch.no_grad():
        monkeypatch.setenv("MII_MOE", "torch")
        looped = moe(x)
        monkeypatch.setenv("MII_MOE", "triton")
        grouped = moe(x)
    assert seen == [expected]
    torch.testing.assert_close(grouped, looped, rtol=1e-4, atol=1e-4)


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
    from mii.ops import dispatch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(variable, raising=False)
    assert enabled(cuda) and not enabled(cpu)
    monkeypatch.setenv(variable, "torch")
    assert not enabled(cuda)
    monkeypatch.setenv(variable, "triton")
    assert enabled(cuda)
    monkeypatch.setattr(dispatch, "INTERPRETED", True)  # the CPU runs it interpreted
    assert enabled(cpu)
    monkeypatch.setattr(dispatch, "INTERPRETED", False)  # the CPU cannot run it
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        enabled(cpu)
    monkeypatch.setenv(variable, "fused")
    with pytest.raises(ValueError, match=f"{variable} must be"):
        enabled(cpu)


# Chunked prompts and preemption in 12 new tokens (a smaller KV pool than TIGHT_OPTIONS'
# 24 blocks): every interpreted MoE pass costs seconds on a CI machine.
SHORT_TIGHT_RUN = dict(TIGHT_OPTIONS, num_kv_blocks=20, new_tokens=12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernel")
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_engine_with_grouped_kernel_matches_hf(moe_checkpoints, tokenizer, name, monkeypatch):  # noqa: F811
    """Whole models through the interpreted kernel (what CUDA runs by default),
    with chunked prompts and preemption: greedy tokens equal transformers'."""
    monkeypatch.setenv("MII_MOE", "triton")
    path, hf_model = moe_checkpoints(name)
    assert_matches_hf(path, hf_model, tokenizer, expect_preemption=True, **SHORT_TIGHT_RUN)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernel")
@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_engine_with_torch_routing_matches_hf(moe_checkpoints, tokenizer, name, monkeypatch):  # noqa: F811
    """MII_MOE_ROUTING=torch (the routing that large passes take by default; this
    test's small passes otherwise route in one launch): greedy tokens still equal
    transformers'."""
    monkeypatch.setenv("MII_MOE", "triton")
    monkeypatch.setenv("MII_MOE_ROUTING", "torch")
    path, hf_model = moe_checkpoints(name)
    assert_matches_hf(path, hf_model, tokenizer, expect_preemption=True, **SHORT_TIGHT_RUN)


def test_auto_routing_fuses_small_passes_only():
    """MII_MOE_ROUTING=auto: one launch up to FUSED_ROUTING_MAX_PAIRS pairs, torch
    operations past it; 'fused' up to what one program lays out; 'torch' never."""
    from mii.ops.triton_moe_layout import FUSED_ROUTING_MAX_PAIRS, fused_routing

    assert fused_routing("auto", 2, 8)
    assert fused_routing("auto", FUSED_ROUTING_MAX_PAIRS, 8)
    assert not fused_routing("auto", FUSED_ROUTING_MAX_PAIRS + 2, 8)
    assert fused_routing("fused", 8192, 8)
    assert not fused_routing("fused", 32768, 256)  # past ONE_PROGRAM_LAYOUT_MAX
    assert not fused_routing("torch", 2, 8)


def _unspecialized(kernel) -> set[str]:
    """The arguments a Triton kernel leaves unspecialised (interpreted or compiled)."""
    if hasattr(kernel, "kwargs"):  # the CPU interpreter keeps the decorator's arguments
        return set(kernel.kwargs.get("do_not_specialize", ()))
    names = kernel.arg_names
    return {names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}


def test_layout_kernels_do_not_specialise_the_pass_size():
    """The routing and layout kernels take the pass's sizes as plain integers: a
    specialised one compiles a variant per divisibility pattern, which eager passes
    (no CUDA graph) first reach mid-serving."""
    from mii.ops import triton_moe, triton_moe_layout

    assert _unspecialized(triton_moe_layout._route_kernel) >= {"tokens", "capacity", "num_blocks"}
    assert _unspecialized(triton_moe_layout._align_kernel) >= {
        "num_pairs",
        "capacity",
        "num_blocks",
    }
    assert "num_pairs" in _unspecialized(triton_moe._grouped_gemm_kernel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles only on CUDA")
def test_routing_compiles_once_per_tile_size(monkeypatch):
    """Mixtral's routing (auto: one launch up to 256 pairs) and expert GEMMs at token
    counts of one tile size compile one variant each, whatever the counts'
    divisibility (eager passes of such counts run mid-serving)."""
    import triton
    import triton.language as tl

    compiled: list[str] = []
    monkeypatch.setattr(
        triton.knobs.runtime, "jit_post_compile_hook", lambda **kw: compiled.append(kw["repr"])
    )

    @triton.jit
    def probe(out):  # a new kernel: its first launch compiles, whatever ran before
        tl.store(out, 1)

    probe[(1,)](torch.zeros(1, device="cuda"))
    assert compiled, "the hook saw no compile: it no longer reports them"
    gate = torch.randn(8, 64, device="cuda")
    for tokens in (48, 33, 37, 64, 101, 128):
        logits = torch.randn(tokens, 64, device="cuda") @ gate.T
        route_and_align(logits, 2, True, 64)
        align_by_expert(torch.randint(0, 8, (tokens, 2), device="cuda"), 8, 64)
        if tokens == 48:  # (compiled now, or by an earlier test in this process)
            compiled.clear()
    assert compiled == []
    # the grouped GEMMs of one tile size (16 x 64 x 256: 5-32 Mixtral tokens) alike
    moe = random_moe(True, num_experts=8, hidden_size=64, intermediate_size=128)
    moe = moe.to("cuda", torch.bfloat16)
    for tokens in (16, 5, 7, 13, 31):
        x = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            weights, experts = moe.route(x)
            moe_grouped_mlp(x, moe.w13, moe.w2, weights, experts, moe.act)
        if tokens == 16:
            compiled.clear()
    assert compiled == []


def test_down_tiles_share_the_layout():
    """The down projection's own tiles keep the row block of the tiles they replace
    (both GEMMs read one layout; a mismatch would raise in every such pass)."""
    from mii.ops.triton_moe import default_down_tiles, default_tiles

    for fp8 in (False, True):
        for pairs in range(1, 9000, 7):
            down = default_down_tiles(pairs, fp8)
            assert down is None or down.block_m == default_tiles(pairs, fp8).block_m, pairs


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
