"""The RMSNorm and act(gate) * up kernels writing their output's float8 copy for
the next float8 decode kernel (``ops/fp8_activations.py``, MII_FP8_FUSED_QUANT=on):
the copy is bit for bit what the quantization launch would write, the kernel
reads it instead of launching one, and the layers' outputs do not change.
Interpreted on the CPU (bfloat16 activations: float32 ones keep exact products
and are never quantized)."""

from __future__ import annotations

import pytest
import torch

from mii.ops import fp8_activations
from mii.ops.fused_elementwise import act_and_mul, rms_norm
from mii.ops.triton_quant import quantize_groups_fp8
from test_triton_kernels import DEVICE


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv("MII_FP8_KERNELS", "triton")
    monkeypatch.setenv("MII_GEMV", "triton")
    monkeypatch.setenv("MII_FUSED", "triton")
    monkeypatch.setenv("MII_FP8_FUSED_QUANT", "on")


def _assert_copy_is_the_launchs(out: torch.Tensor, width: int) -> None:
    copy = fp8_activations.take(out, width)
    assert copy is not None, "no float8 copy attached"
    values, scales = quantize_groups_fp8(out.reshape(-1, out.shape[-1]), width)
    assert torch.equal(copy[0].view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(copy[1], scales)


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize(
    "n, width", [(200, 32), (512, 256), (300, 64), (4096, 256), (4096, 128), (5120, 512)]
)
def test_rms_norm_writes_the_quantization_launchs_copy(n, width, gemma):
    """Hidden sizes that end inside a slice (200 in slices of 32), with a residual
    and an outlier that gets a slice of its own scale; and the production shapes
    (Llama hidden sizes, 8 warps, one program per slice of 128-512 columns)."""
    gen = torch.Generator().manual_seed(n + width)
    x = torch.randn(3, n, generator=gen).bfloat16()
    x[1, 7] = 300.0
    residual = torch.randn(3, n, generator=gen).bfloat16()
    weight = (torch.rand(n, generator=gen) + 0.5).bfloat16()
    args = [t.to(DEVICE) for t in (x, weight)]
    out, summed = rms_norm(*args, 1e-5, gemma, residual.to(DEVICE), fp8_slices=width)
    plain, plain_summed = rms_norm(*args, 1e-5, gemma, residual.to(DEVICE))
    assert torch.equal(out, plain) and torch.equal(summed, plain_summed)
    _assert_copy_is_the_launchs(out, width)
    assert fp8_activations.take(plain, width) is None  # none asked for, none made
    assert fp8_activations.take(out, width * 2) is None  # another width: not this copy


@pytest.mark.parametrize("n, width", [(300, 64), (2500, 256), (1024, 512)])
def test_act_and_mul_writes_the_quantization_launchs_copy(n, width):
    """One program per 512 columns (300), several of 1,024 with a ragged end (2,500)."""
    gen = torch.Generator().manual_seed(n)
    gate_up = (torch.randn(2, 2 * n, generator=gen) * 3).bfloat16().to(DEVICE)
    out = act_and_mul(gate_up, "silu", fp8_slices=width)
    assert torch.equal(out, act_and_mul(gate_up, "silu"))
    _assert_copy_is_the_launchs(out, width)


def test_a_copy_is_not_taken_once_its_tensor_changed_in_place():
    """A copy stands for the tensor as it was written: after an in-place change (a
    later layer scaling it, say) the float8 kernel quantizes the tensor itself."""
    x = torch.randn(2, 512).bfloat16().to(DEVICE)
    out = rms_norm(x, torch.ones(512).bfloat16().to(DEVICE), 1e-5, fp8_slices=256)
    assert fp8_activations.take(out, 256) is not None
    out.mul_(2)
    assert fp8_activations.take(out, 256) is None


def test_no_copy_where_the_slices_do_not_tile_a_program():
    """A row of 64 columns cannot hold slices of 256: no copy (the float8 kernel then
    quantizes x itself); float32 outputs are never copied."""
    x = torch.randn(2, 64).bfloat16().to(DEVICE)
    assert (
        fp8_activations.take(
            rms_norm(x, torch.ones(64).bfloat16().to(DEVICE), 1e-5, fp8_slices=256), 256
        )
        is None
    )
    x32 = torch.randn(2, 512).to(DEVICE)
    assert (
        fp8_activations.take(rms_norm(x32, torch.ones(512).to(DEVICE), 1e-5, fp8_slices=256), 256)
        is None
    )


def _fp8_mlp(hidden: int, inter: int):
    """A float8 GatedMLP with its input norm, weights from a fixed seed."""
    from mii.models.layers import GatedMLP, RMSNorm
    from mii.models.weight_quant import fp8_weights

    gen = torch.Generator().manual_seed(5)
    with fp8_weights("online"):
        mlp = GatedMLP(hidden, inter, "silu", bias=False)
        mlp.gate_up_proj.weight_loader(
            "weight",
            mlp.gate_up_proj.weight,
            torch.randn(2 * inter, hidden, generator=gen),
            "packed",
        )
        mlp.down_proj.weight_loader(
            "weight", mlp.down_proj.weight, torch.randn(hidden, inter, generator=gen) / 8
        )
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.rand(hidden, generator=gen) + 0.5
    return norm.bfloat16().to(DEVICE), mlp.to(DEVICE)


def test_the_layers_read_the_copies_instead_of_launching(monkeypatch):
    """RMSNorm(quantize_for=gate_up) -> GatedMLP at batch 2, float8 weights: with the
    switch on, no quantization launch (the norm and the activation kernel wrote the
    copies at the widths their readers' launches take), and the same output as with
    the launches (off)."""
    import mii.ops.triton_quant as quant

    norm, mlp = _fp8_mlp(512, 1024)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(6)).bfloat16().to(DEVICE)
    launches = []
    original = quant.quantize_groups_fp8
    monkeypatch.setattr(quant, "quantize_groups_fp8", lambda *a: launches.append(1) or original(*a))

    def run() -> torch.Tensor:
        h = norm(x, quantize_for=mlp.gate_up_proj)
        return mlp(h)

    fused = run()
    assert launches == []
    assert fp8_activations.slices_for(x, mlp.gate_up_proj) == 256
    monkeypatch.setenv("MII_FP8_FUSED_QUANT", "off")
    assert fp8_activations.slices_for(x, mlp.gate_up_proj) == 0
    assert torch.equal(run(), fused)
    assert len(launches) == 2  # gate_up's input and down's


@pytest.mark.parametrize("switch", ["on", "norm"])
def test_at_one_row_no_copy_is_made_and_no_launch_quantizes(monkeypatch, switch):
    """Batch 1 (MII_GEMV_ONE_ROW=cores, the default): the float8 kernels read x
    unquantized, so the norm writes no copy, the gated gate/up kernel computes
    act * up (whatever MII_FP8_FUSED_QUANT says) and nothing launches a
    quantization; the output is the reference path's to bf16 rounding."""
    import mii.ops.triton_quant as quant

    monkeypatch.setenv("MII_FP8_FUSED_QUANT", switch)
    norm, mlp = _fp8_mlp(512, 1024)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(7)).bfloat16().to(DEVICE)
    launches = []
    original = quant.quantize_groups_fp8
    monkeypatch.setattr(quant, "quantize_groups_fp8", lambda *a: launches.append(1) or original(*a))
    assert fp8_activations.slices_for(x, mlp.gate_up_proj) == 0
    h = norm(x, quantize_for=mlp.gate_up_proj)
    assert fp8_activations.take(h, 256) is None and mlp._gated_kernel_takes(h)
    out = mlp(h)
    assert launches == []
    # against the reference path (float8 weights dequantized, F.linear): bf16 roundings.
    # (Not MII_GEMV=torch: on a GPU with float8 tensor cores that runs torch._scaled_mm,
    # which quantizes x per token: the 2026-12-06 H200 run failed on that difference.)
    from mii.ops.fp8_linear import fp8_linear_reference

    up_proj, down_proj = mlp.gate_up_proj, mlp.down_proj
    gate, up = fp8_linear_reference(h, up_proj.weight, up_proj.weight_scale).float().chunk(2, -1)
    inner = (torch.nn.functional.silu(gate) * up).bfloat16()
    want = fp8_linear_reference(inner, down_proj.weight, down_proj.weight_scale).float()
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernels")
def test_a_float8_llama_decodes_the_same_with_the_copies(checkpoints, monkeypatch):
    """The Llama decoder end to end (bf16 activations, float8 weights, 256 wide: the
    norms' and activations' rows hold whole slices): with MII_FP8_FUSED_QUANT=on the
    input norm feeds qkv, the post-attention norm gate_up and act*up down their float8
    copies, so of a layer's four quantization launches only o_proj's stays (its input
    is attention's output); with 'norm' o_proj's and down_proj's; greedy tokens as
    with the launches."""
    import mii
    import mii.ops.triton_quant as quant

    path, _ = checkpoints("llama", hidden_size=256, intermediate_size=256)
    launches = []
    original = quant.quantize_groups_fp8
    monkeypatch.setattr(quant, "quantize_groups_fp8", lambda *a: launches.append(1) or original(*a))
    tokens, counts = {}, {}
    for switch in ("on", "off", "norm"):
        monkeypatch.setenv("MII_FP8_FUSED_QUANT", switch)
        launches.clear()
        with mii.pipeline(str(path), quantization="fp8", dtype="bfloat16") as pipe:
            responses = pipe(["Paris is", "The sea"], do_sample=False, max_new_tokens=4)
        tokens[switch] = [r.token_ids for r in responses]
        counts[switch] = len(launches)
    assert counts["on"] > 0 and counts["off"] == 4 * counts["on"]
    # 'norm': the norms' copies only; act * up in the gated gate/up kernel (float8
    # weights: on by default), whose output down's launch quantizes
    assert counts["norm"] == 2 * counts["on"]
    assert tokens["on"] == tokens["off"] == tokens["norm"]


def test_by_default_the_norms_write_copies_and_act_times_up_does_not(monkeypatch):
    """MII_FP8_FUSED_QUANT's default, 'norm' (faster on an H200): a norm feeding a
    float8 layer writes its copy; act * up (computed in the gated gate/up kernel by
    default) is left to down_proj's own quantization launch."""
    monkeypatch.delenv("MII_FP8_FUSED_QUANT")
    _, mlp = _fp8_mlp(512, 1024)
    x = torch.randn(2, 512).bfloat16().to(DEVICE)
    gate_up = torch.randn(2, 2048).bfloat16().to(DEVICE)
    assert fp8_activations.slices_for(x, mlp.gate_up_proj) == 256
    assert fp8_activations.slices_for(gate_up, mlp.down_proj, writer="act") == 0
    monkeypatch.setenv("MII_FP8_FUSED_QUANT", "on")
    assert fp8_activations.slices_for(gate_up, mlp.down_proj, writer="act") == 256
