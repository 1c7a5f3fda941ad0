"""Programmatic dependent launch: the switch, and on a Hopper GPU a decode-shaped
chain of PDL kernels replayed from a CUDA graph gives exactly what the same
kernels give launched one after another."""

from __future__ import annotations

import pytest
import torch

from mii.ops.dispatch import dependent_launch_enabled


def test_off_on_cpu_and_when_asked(monkeypatch):
    assert not dependent_launch_enabled(torch.device("cpu"))
    monkeypatch.setenv("MII_PDL", "off")
    assert not dependent_launch_enabled(torch.device("cuda", 0))
    monkeypatch.setenv("MII_PDL", "yes")
    with pytest.raises(ValueError, match="MII_PDL"):
        dependent_launch_enabled(torch.device("cpu"))


def test_on_hopper_off_on_rocm_and_without_triton_support(monkeypatch):
    """On for capability 9.0 under compiled Triton; off on ROCm, which reports gfx
    versions as CUDA capabilities (MI300: 9.4), and where Triton (before 3.4) has no
    griddepcontrol."""
    from mii.ops import dispatch, triton_pdl

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    assert dependent_launch_enabled(gpu)
    monkeypatch.setattr(triton_pdl, "AVAILABLE", True)
    assert triton_pdl.launch_options(gpu) == {"PDL": True, "launch_pdl": True}
    wait_first = {"PDL": triton_pdl.WAIT_THEN_RELEASE, "launch_pdl": True}
    assert triton_pdl.launch_options(gpu, small=True) == wait_first
    monkeypatch.setenv("MII_PDL_EARLY_RELEASE", "on")
    assert triton_pdl.launch_options(gpu, small=True) == {
        "PDL": triton_pdl.RELEASE_THEN_WAIT,
        "launch_pdl": True,
    }
    assert triton_pdl.launch_options(gpu) == wait_first  # the skinny linear kernel: never
    monkeypatch.setenv("MII_PDL_EARLY_RELEASE", "early")
    with pytest.raises(ValueError, match="MII_PDL_EARLY_RELEASE"):
        triton_pdl.launch_options(gpu, small=True)
    monkeypatch.delenv("MII_PDL_EARLY_RELEASE")
    monkeypatch.setattr(triton_pdl, "AVAILABLE", False)
    assert triton_pdl.launch_options(gpu) == {"PDL": False}
    monkeypatch.setattr(dispatch, "_capability", lambda index: (8, 0))
    assert not dependent_launch_enabled(gpu)
    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not dependent_launch_enabled(gpu)


hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="programmatic dependent launch needs a Hopper or newer GPU",
)


def _chain(x, residual, norm_w, gate_up_w, down_w):
    """One MLP half of a decode layer: norm -> gate_up -> act*up -> down -> norm."""
    from mii.ops.fused_elementwise import act_and_mul, rms_norm
    from mii.ops.triton_gemv import skinny_linear

    h, residual = rms_norm(x, norm_w, 1e-5, residual=residual)
    h = act_and_mul(skinny_linear(h, gate_up_w), "silu")
    h = skinny_linear(h, down_w)
    return rms_norm(h, norm_w, 1e-5, residual=residual)


@hopper
@pytest.mark.parametrize("release", ["off", "on"])
@pytest.mark.parametrize("rows", [1, 8])
def test_dependent_launches_in_a_graph_keep_the_order(rows, release, monkeypatch):
    """Each kernel must wait for its predecessor before it reads: without the waits
    the small kernels would read the big matmuls' outputs half written. With
    MII_PDL_EARLY_RELEASE=on the small kernels let the next linear kernel launch
    before they wait, so two kernels ahead of the one running may be on the GPU."""
    monkeypatch.setenv("MII_PDL_EARLY_RELEASE", release)
    assert dependent_launch_enabled(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    hidden, inter = 4096, 11008
    norm_w = torch.rand(hidden, generator=gen, **bf16) + 0.5
    gate_up_w = torch.randn(2 * inter, hidden, generator=gen, **bf16) / 64
    down_w = torch.randn(hidden, inter, generator=gen, **bf16) / 100
    x = torch.empty(rows, hidden, **bf16)
    residual = torch.empty(rows, hidden, **bf16)

    def inputs(step):
        g = torch.Generator(device="cuda").manual_seed(100 + step)
        return torch.randn(rows, hidden, generator=g, **bf16), torch.randn(
            rows, hidden, generator=g, **bf16
        )

    x.copy_(inputs(0)[0])
    residual.copy_(inputs(0)[1])
    _chain(x, residual, norm_w, gate_up_w, down_w)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, res_out = _chain(x, residual, norm_w, gate_up_w, down_w)
    replayed = []
    for step in range(20):
        a, b = inputs(step)
        x.copy_(a)
        residual.copy_(b)
        graph.replay()
        replayed.append((out.clone(), res_out.clone()))
    torch.cuda.synchronize()

    monkeypatch.setenv("MII_PDL", "off")
    for step, (got, got_res) in enumerate(replayed):
        a, b = inputs(step)
        want, want_res = _chain(a, b, norm_w, gate_up_w, down_w)
        assert torch.equal(got, want), step
        assert torch.equal(got_res, want_res), step


def _attention_half(x, w_qkv, w_o, positions, cos_sin, caches, batch, kv_heads):
    """The attention half of a decode layer: qkv -> rotary + KV write -> attention
    (split-KV at batch 1, slices merged in the launch) -> o."""
    from mii.ops.triton_attention import paged_attention_from_cache, rotary_cache_write
    from mii.ops.triton_gemv import skinny_linear

    k_cache, v_cache = caches
    q, k, v = skinny_linear(x, w_qkv).view(x.shape[0], -1, 128).split([32, kv_heads, kv_heads], 1)
    rotary_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, batch.slot_mapping)
    out = paged_attention_from_cache(q, k_cache, v_cache, batch, 128**-0.5)
    return skinny_linear(out.view(x.shape[0], -1), w_o)


@hopper
@pytest.mark.parametrize("contexts", [(700,), (700, 300, 129)], ids=["one", "three"])
@pytest.mark.parametrize("early", ["off", "on"])
@pytest.mark.parametrize("merge", ["launch", "kernel"])
@pytest.mark.parametrize("kv_heads", [32, 8])
@pytest.mark.parametrize("release", ["off", "on"])
def test_attention_in_a_graph_keeps_the_order(
    release, kv_heads, merge, early, contexts, monkeypatch
):
    """Split-KV attention between its rotary kernel and the o projection, replayed
    with a new token per sequence each time (written into the cache, then attended
    to), gives what launches without PDL give: with MII_ATTENTION_EARLY_LOADS=on (the
    attention kernel reads its tile table, lengths and block table and prefetches the
    cached keys before it waits) and with the slices merged in the attention launch
    (three sequences: their tiles' arrival counts run at once on the GPU)."""
    from mii.ops.attention import AttentionBatch, TileSet, plan_tiles
    from mii.ops.rotary import rotary_cos_sin

    monkeypatch.setenv("MII_SPLIT_KV_MERGE", merge)
    monkeypatch.setenv("MII_ATTENTION_EARLY_LOADS", early)
    monkeypatch.setenv("MII_PDL_EARLY_RELEASE", release)  # MII_PDL=off ignores it
    gen = torch.Generator(device="cuda").manual_seed(1)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    ints = dict(device="cuda", dtype=torch.int32)
    block, seqs = 16, len(contexts)  # a new token's key is its sequence's last
    widths = [c // block + 1 for c in contexts]
    starts = [sum(widths[:i]) for i in range(seqs)]
    caches = [
        torch.randn(sum(widths), block, kv_heads, 128, generator=gen, **bf16) for _ in range(2)
    ]
    w_qkv = torch.randn((32 + 2 * kv_heads) * 128, 4096, generator=gen, **bf16) / 64
    w_o = torch.randn(4096, 4096, generator=gen, **bf16) / 64
    tables = torch.zeros(seqs, max(widths), **ints)
    for i, (start, width) in enumerate(zip(starts, widths, strict=True)):
        tables[i, :width] = torch.arange(start, start + width, **ints)
    batch = AttentionBatch(
        slot_mapping=torch.tensor(
            [s * block + c - 1 for s, c in zip(starts, contexts, strict=True)], device="cuda"
        ),
        block_tables=tables,
        cu_seqlens_q=torch.arange(seqs + 1, **ints),
        seq_lens=torch.tensor(contexts, **ints),
        query_lens_host=[1] * seqs,
        seq_lens_host=list(contexts),
        tiles=[
            TileSet(size, torch.tensor(tile_seqs, **ints), torch.tensor(tile_starts, **ints))
            for size, tile_seqs, tile_starts in plan_tiles([1] * seqs)
        ],
    )
    positions = torch.tensor([c - 1 for c in contexts], device="cuda")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    cos_sin = rotary_cos_sin(inv_freq, max(contexts))
    x = torch.empty(seqs, 4096, **bf16)
    args = (w_qkv, w_o, positions, cos_sin, caches, batch, kv_heads)

    def token(step):
        g = torch.Generator("cuda").manual_seed(step)
        return torch.randn(seqs, 4096, generator=g, **bf16)

    x.copy_(token(0))
    _attention_half(x, *args)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _attention_half(x, *args)
    replayed = []
    for step in range(10):
        x.copy_(token(step))
        graph.replay()
        replayed.append(out.clone())
    torch.cuda.synchronize()

    monkeypatch.setenv("MII_PDL", "off")
    monkeypatch.setenv("MII_SPLIT_KV_MERGE", "launch")  # the reference: plain launches
    for step, got in enumerate(replayed):
        assert torch.equal(got, _attention_half(token(step), *args)), step
