"""The grouped expert kernel on float8 e4m3 experts (per expert and output channel
scales, dequantized in the kernel) against the reference path (the torch expert
loop on dequantized weights), on CPU under TRITON_INTERPRET=1 (conftest) and on
the GPU when there is one; and a tiny fp8 Mixtral through it, token for token."""

from __future__ import annotations

import pytest
import torch

import mii
from fp8_checkpoints import dequantized_model
from helpers import PROMPTS, assert_greedy_margins, hf_greedy
from mii.models.moe import SparseMoE
from mii.models.weight_quant import fp8_weights
from mii.ops.fp8_linear import FP8_DTYPE, quantize_per_token, quantize_rows
from mii.ops.triton_moe import TileConfig, default_tiles, grouped_gemm, moe_grouped_mlp
from mii.ops.triton_moe_layout import align_by_expert
from test_family_mixtral import random_moe


@pytest.fixture(autouse=True)
def _fp8_kernels_on(monkeypatch):
    """On by default where Triton reads float8; set here so that a user's
    MII_FP8_KERNELS=off does not turn them off (the CPU interpreter ignores it)."""
    monkeypatch.setenv("MII_FP8_KERNELS", "triton")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_fp8_moe(renormalize: bool = True, dtype=torch.float32, **sizes) -> SparseMoE:
    """``random_moe``'s layer with its experts quantized per (expert, output channel)."""
    dense = random_moe(renormalize, **sizes)
    sizes = {
        "hidden_size": dense.gate.in_features,
        "intermediate_size": dense.intermediate_size,
        "num_experts": dense.num_experts,
        "top_k": dense.top_k,
    }
    with fp8_weights("online"):
        moe = SparseMoE(**sizes, renormalize=renormalize)
    with torch.no_grad():
        # Rows of different magnitudes: each (expert, channel) scale matters.
        w13 = dense.w13 * torch.linspace(0.1, 3, dense.w13.shape[1])[None, :, None]
        for name, w in (("w13", w13), ("w2", dense.w2)):
            wq, scale = quantize_rows(w)
            getattr(moe, name).copy_(wq)
            getattr(moe, f"{name}_scale").copy_(scale)
        moe.gate.weight.copy_(dense.gate.weight)
    moe.gate.to(dtype)
    return moe.to(DEVICE)


@pytest.mark.parametrize(
    ("tokens", "sizes", "tiles"),
    [
        (1, {}, None),
        (3, {"top_k": 1}, None),
        (37, {}, None),
        (300, {"num_experts": 4}, None),  # prompt-sized: the larger row block
        (9, {"hidden_size": 80, "intermediate_size": 72}, None),  # K over tiles, masked
        (9, {"hidden_size": 80, "intermediate_size": 72}, TileConfig(16, 32, 32, dequant=1)),
    ],
)
def test_fp8_grouped_mlp_matches_the_reference_path(tokens, sizes, tiles):
    moe = random_fp8_moe(**sizes)
    x = torch.randn(tokens, moe.gate.in_features, generator=torch.Generator().manual_seed(4))
    x = x.to(DEVICE)
    with torch.no_grad():
        weights, experts = moe.route(x)
        got = moe_grouped_mlp(
            x, moe.w13, moe.w2, weights, experts, moe.act, tiles, moe.w13_scale, moe.w2_scale
        )
        reference = moe.forward_torch(x, weights, experts)  # dequantizes one expert at a time
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
        dequantized = moe_grouped_mlp(x, *moe.expert_weights(x.dtype), weights, experts, moe.act)
        # (scaling the products instead of the weights rounds differently: under an AMD
        # EPYC's interpreter one value of 720 came 1.5e-4 apart, in outputs up to ~600)
        torch.testing.assert_close(got, dequantized, rtol=1e-4, atol=3e-4)


@pytest.mark.parametrize("fp8_dot", [False, True], ids=["16-bit-products", "fp8-products"])
def test_fp8_grouped_mlp_in_bfloat16(fp8_dot):
    """bf16 activations, with each way of multiplying (``TileConfig.fp8_dot``): within
    bf16 rounding of the float32 result, plus activation quantization with float8
    products."""
    moe = random_fp8_moe(hidden_size=64, intermediate_size=32)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        expected = moe.forward_torch(x, *moe.route(x))
        moe.gate.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        weights, experts = moe.route(xb)
        tiles = default_tiles(experts.numel())._replace(fp8_dot=fp8_dot)
        got = moe_grouped_mlp(
            xb, moe.w13, moe.w2, weights, experts, moe.act, tiles, moe.w13_scale, moe.w2_scale
        )
        reference = moe.forward_torch(xb, weights, experts).float()
    assert got.dtype == torch.bfloat16
    bound = 0.08 if fp8_dot else 0.03
    assert (got.float() - expected).abs().max() < bound * expected.abs().max()
    assert (got.float() - reference).norm() < bound * reference.norm()


def test_fp8_products_quantize_each_slice_of_each_row():
    """One grouped GEMM with float8 products equals its emulation: each pair's
    BLOCK_K slice of activations quantized to e4m3 with its own scale (torch's
    rounding), times the float8 expert, scaled back per slice, then the channel
    scale. A row with an outlier shows that the scale is per row and slice."""
    gen = torch.Generator().manual_seed(8)
    experts_n, n, k, block_k = 2, 24, 96, 32
    w = torch.randn(experts_n, n, k, generator=gen)
    wq, scale = quantize_rows(w)
    a = torch.randn(6, k, generator=gen).to(torch.bfloat16)
    a[1, 3] = 200.0
    experts = torch.tensor([0, 1, 1, 0, 1, 0]).reshape(6, 1)
    tiles = TileConfig(16, 16, block_k, fp8_dot=True)
    sorted_pairs, block_expert = align_by_expert(experts.to(DEVICE), experts_n, tiles.block_m)
    args = (sorted_pairs, block_expert, 6, 1, tiles, None, scale.to(DEVICE))
    out = grouped_gemm(a.to(DEVICE), wq.to(DEVICE), *args).cpu().float()
    want = torch.zeros(6, n)
    for k0 in range(0, k, block_k):
        part = a[:, k0 : k0 + block_k].float()
        aq, a_scale = quantize_per_token(part)  # the reference quantization
        aq = aq.float()
        for t in range(6):
            e = int(experts[t])
            want[t] += (aq[t] @ wq[e, :, k0 : k0 + block_k].float().T) * a_scale[t]
    want *= scale[experts[:, 0]]
    if DEVICE.type == "cpu":  # interpreted: the emulation's numbers, one bf16 rounding
        torch.testing.assert_close(out, want, rtol=2**-7, atol=1e-3 * want.abs().mean().item())
    else:  # the GPU's approximate reciprocal may pick a neighbouring float8 value
        assert (out - want).norm() <= 1.5e-2 * want.norm()


@pytest.mark.parametrize(
    "tokens, hidden, inter", [(3, 64, 96), (40, 64, 96), (1, 80, 72), (9, 112, 40)]
)
def test_activations_quantized_once_equal_the_in_loop_quantization(tokens, hidden, inter):
    """``TileConfig.a_groups``: the activations' slices quantized by a launch of their
    own before each grouped GEMM, not in every column block's loop, each slice's
    scales loaded a trip ahead: the same output from the whole expert MLP (same
    scales, float8 values and sums), also where K ends inside a slice (80, 72,
    112, 40 against 32-column slices) and with outliers in several slices."""
    tiles = TileConfig(16, 32, 32, fp8_dot=True)
    in_loop, once = _bf16_outputs(
        [tiles, tiles._replace(a_groups=True)], tokens, hidden, inter, seed=tokens, outliers=7
    )
    assert torch.equal(once, in_loop)


def _bf16_outputs(
    tiles: list, tokens: int, hidden: int, inter: int, seed: int, outliers: int
) -> list:
    """A random float8 expert MLP's output with each of ``tiles``, on one bf16 input
    whose every ``outliers``-th column is 15x larger than the rest."""
    moe = random_fp8_moe(hidden_size=hidden, intermediate_size=inter)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)) * 2
    x[:, ::outliers] *= 15
    x = x.to(torch.bfloat16).to(DEVICE)
    with torch.no_grad():
        moe.gate.to(torch.bfloat16)
        weights, experts = moe.route(x)
        args = (x, moe.w13, moe.w2, weights, experts, moe.act)
        return [moe_grouped_mlp(*args, t, moe.w13_scale, moe.w2_scale) for t in tiles]


@pytest.mark.parametrize(
    "mode",
    [dict(fp8_dot=True, a_groups=True), dict(fp8_dot=True), dict(fp8_dot=False, dequant=0)],
    ids=["fp8-products-quantized-once", "fp8-products", "16-bit-products"],
)
@pytest.mark.parametrize("tokens, hidden, inter", [(1, 64, 96), (9, 112, 40), (40, 64, 96)])
def test_swapped_tiles_give_the_plain_tiles_output(mode, tokens, hidden, inter):
    """``TileConfig.swap_ab``: the transposed product (weights' columns as the tensor
    cores' rows, pairs as its columns; each pair's slice scale then on a column) gives
    the plain tile's output: the same float8 values and scales, the same sums (K
    ending inside a slice: 112 and 40 against 32 columns; row blocks of several
    experts; masked columns where N is not a multiple of the block).

    Bit for bit under the interpreter and for 16-bit products. On the GPU, float8
    products go through float8 ``wgmma`` when swapped and ``mma.sync`` when not, and
    the former's accumulator keeps fewer bits than float32 (one GEMM: within 2e-3,
    ``test_fp8_kernels_gpu``); through the whole expert MLP the intermediate's float8
    rounding spreads that (H200, 2026-12-04: 3-14 % of the elements differ), so on
    Hopper the bounds are 2.5-3x the largest seen there over 15 cases (these and
    larger, three seeds each): the whole output's relative difference at most 5.9e-3,
    any element's difference at most 0.083 of its row's RMS (an element computed
    wrong would be off by about its row's RMS)."""
    tiles = TileConfig(16, 64, 32, **mode)
    plain, swapped = _bf16_outputs(
        [tiles, tiles._replace(swap_ab=True)], tokens, hidden, inter, seed=tokens + 7, outliers=5
    )
    hopper = DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] == 9
    if hopper and mode["fp8_dot"]:
        plain, swapped = plain.double(), swapped.double()
        relative = (swapped - plain).norm() / plain.norm()
        row_rms = plain.pow(2).mean(dim=-1, keepdim=True).sqrt()
        worst = ((swapped - plain).abs() / row_rms).max()
        assert relative < 1.5e-2 and worst < 0.25, (relative.item(), worst.item())
    else:
        torch.testing.assert_close(swapped, plain, rtol=0, atol=0)


def test_bf16_decode_tiles_are_swapped():
    """The measured defaults: decode-sized bf16 launches (their down projections' own
    tiles too) computed transposed; float8 decode and prompt-sized launches not."""
    from mii.ops.triton_moe import default_down_tiles

    assert default_tiles(2).swap_ab and default_tiles(64).swap_ab
    assert default_down_tiles(2).swap_ab
    assert not default_tiles(2, fp8=True).swap_ab
    assert not default_tiles(4096).swap_ab and not default_tiles(4096, fp8=True).swap_ab


@pytest.mark.parametrize("dequant", [0, 1], ids=["cvt", "integer-ops"])
def test_every_finite_e4m3_value_and_each_expert_channel_scale(dequant):
    """a = identity picks each weight: C[pair, n] = float(B[e, n, k]) * scale[e, n]
    exactly, for all 254 finite e4m3 encodings in each of two experts, in either
    conversion (``TileConfig.dequant``)."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[[0x7F, 0xFF]] = 0  # e4m3fn's NaNs
    weight = torch.stack([codes, codes.flip(0)]).view(FP8_DTYPE).reshape(2, 16, 16)
    scale = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) + 0.5
    a = torch.eye(16)
    experts = torch.tensor([0] * 8 + [1] * 8).reshape(16, 1)  # token t, one pair each
    tiles = TileConfig(16, 16, 16, dequant=dequant)
    sorted_pairs, block_expert = align_by_expert(experts.to(DEVICE), 2, tiles.block_m)
    out = grouped_gemm(
        a.to(DEVICE),
        weight.to(DEVICE),
        sorted_pairs,
        block_expert,
        16,
        1,
        tiles,
        None,
        scale.to(DEVICE),
    ).cpu()
    for t in range(16):
        e = int(experts[t])
        assert torch.equal(out[t], weight[e, :, t].float() * scale[e]), t


def test_grouped_gemm_names_bad_scales():
    weight = torch.zeros(2, 8, 16, dtype=FP8_DTYPE)
    pairs, blocks = align_by_expert(torch.zeros(1, 1, dtype=torch.long), 2, 16)
    args = (torch.zeros(1, 16), weight, pairs, blocks, 1, 1, TileConfig(16, 16, 16))
    with pytest.raises(ValueError, match="weight_scale exactly with float8"):
        grouped_gemm(*args)
    with pytest.raises(ValueError, match=r"float32 weight_scale of shape \(2, 8\)"):
        grouped_gemm(*args, None, torch.ones(2, 4))
    with pytest.raises(ValueError, match="weight_scale exactly with float8"):
        grouped_gemm(*args[:1], weight.float(), *args[2:], None, torch.ones(2, 8))


def test_layer_gives_the_kernel_float8_experts(monkeypatch):
    """MII_MOE=triton: the layer hands its float8 experts and scales to the kernel as
    they are (no 16-bit copy per pass), where Triton reads float8; elsewhere it
    dequantizes them first."""
    import mii.models.moe as moe_module
    import mii.ops.triton_moe as kernels

    moe = random_fp8_moe()
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    seen = []
    original = kernels.grouped_gemm
    monkeypatch.setattr(
        kernels, "grouped_gemm", lambda a, w, *r: seen.append(w.dtype) or original(a, w, *r)
    )
    with torch.no_grad():
        monkeypatch.setenv("MII_MOE", "torch")
        looped = moe(x)
        assert not seen
        monkeypatch.setenv("MII_MOE", "triton")
        grouped = moe(x)
        assert seen == [FP8_DTYPE, FP8_DTYPE]
        seen.clear()
        monkeypatch.setattr(moe_module, "fp8_triton_supported", lambda device: False)
        dequantized = moe(x)
        assert seen == [torch.float32, torch.float32]
    torch.testing.assert_close(grouped, looped, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dequantized, looped, rtol=1e-4, atol=1e-4)


def test_fp8_shared_memory_plan_counts_one_byte_per_weight():
    from mii.ops.triton_moe import stages_that_fit

    cpu, tiles = torch.device("cpu"), TileConfig(128, 256, 64, 8, 4)
    # bf16 A + bf16 B: 48 KB a stage, 3 fit in 160 KB; with float8 B: 32 KB, all 4.
    assert stages_that_fit(tiles, 64, 2, cpu) == 3
    assert stages_that_fit(tiles, 64, 2, cpu, b_element_size=1) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernel")
def test_fp8_mixtral_through_the_kernels_token_for_token(tmp_path, tokenizer, monkeypatch):
    """A tiny fp8 Mixtral with every fused float8 kernel on (the grouped experts and
    the skinny decode kernel, interpreted) and with none (the reference path): the
    same greedy tokens, those of transformers on the dequantized weights."""
    import mii.ops.triton_gemv as gemv
    import mii.ops.triton_moe as kernels
    from test_family_mixtral import hf_model_from_config, mixtral_config

    hf_model = hf_model_from_config(mixtral_config(tokenizer))
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    oracle = dequantized_model(hf_model)
    prompts, new_tokens = PROMPTS[:3], 8
    assert_greedy_margins(oracle, tokenizer, prompts, new_tokens)
    seen = []
    original = kernels.grouped_gemm
    monkeypatch.setattr(
        kernels, "grouped_gemm", lambda a, w, *r: seen.append(w.dtype) or original(a, w, *r)
    )
    skinny = gemv.skinny_linear_fp8
    monkeypatch.setattr(gemv, "skinny_linear_fp8", lambda *a: seen.append("skinny") or skinny(*a))
    outputs = {}
    for choice in ("triton", "torch"):
        monkeypatch.setenv("MII_MOE", choice)
        monkeypatch.setenv("MII_GEMV", choice)
        with mii.pipeline(str(tmp_path), quantization="fp8") as pipe:
            responses = pipe(prompts, do_sample=False, max_new_tokens=new_tokens)
        outputs[choice] = [r.token_ids for r in responses]
        if choice == "triton":
            assert FP8_DTYPE in seen and "skinny" in seen
            assert all(s in (FP8_DTYPE, "skinny") for s in seen)
        else:
            assert not seen
        seen.clear()
    assert outputs["triton"] == outputs["torch"]
    assert outputs["triton"] == [hf_greedy(oracle, tokenizer, p, new_tokens) for p in prompts]
