"""Paged attention over a ragged batch: the pure-torch reference.

A batch holds B sequences. Sequence b contributes ``query_len[b]`` new tokens
(a prompt chunk, or 1 for a decode step) whose keys and values are first written
into the paged KV cache, then every new token attends causally to all of the
sequence's keys so far (``seq_len[b]`` of them, the new ones included), read
through its block table.

KV cache layout (one tensor per layer for keys, one for values):
    [num_blocks, block_size, num_kv_heads, head_dim]
A token's slot is ``block_id * block_size + offset_in_block``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mii.ops.transfer import upload


@dataclass
class AttentionBatch:
    """Where each token of a ragged batch lives in the KV cache."""

    slot_mapping: torch.Tensor  # [T] int64, cache slot of every new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, offsets of each sequence's new tokens
    seq_lens: torch.Tensor  # [B] int32, keys per sequence after this step
    query_lens_host: list[int]  # host copies, so the reference needs no device sync
    seq_lens_host: list[int]
    # The attention kernel's work, one TileSet per launch. Built with the batch so
    # that kernels never read host lists (and can run inside a CUDA graph); None
    # lets the kernel wrapper build them from the host lists.
    tiles: list[TileSet] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


@dataclass
class TileSet:
    """One attention-kernel launch: programs of ``size`` queries, each at
    (sequence index ``seq[i]``, first query ``start[i]`` within the sequence's chunk)."""

    size: int
    seq: torch.Tensor  # [tiles] int32
    start: torch.Tensor  # [tiles] int32


# Query tiles: 16 for decodes, 128 for prompt chunks (the prompt size won
# benchmarks/prefill_sweep.py on the H200: see triton_attention.PROMPT_LAUNCH).
SMALL_TILE, LARGE_TILE = 16, 128


def make_tiles(
    query_lens: list[int], size: int, only: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """(sequence index, first query) of every ``size``-query tile of the sequences
    ``only`` (default: all)."""
    seqs: list[int] = []
    starts: list[int] = []
    for b in range(len(query_lens)) if only is None else only:
        for start in range(0, query_lens[b], size):
            seqs.append(b)
            starts.append(start)
    return seqs, starts


def plan_tiles(query_lens: list[int]) -> list[tuple[int, list[int], list[int]]]:
    """Split a batch's attention into at most two launches: sequences with few new
    tokens (decodes) in 16-query tiles, longer prompt chunks in 128-query tiles,
    which read each key block 8x less often. A decode never pays for a prompt-sized tile.
    Returns (size, sequence indices, first queries) per non-empty launch."""
    short = [b for b, n in enumerate(query_lens) if n <= SMALL_TILE]
    long = [b for b, n in enumerate(query_lens) if n > SMALL_TILE]
    plan = []
    for size, members in ((SMALL_TILE, short), (LARGE_TILE, long)):
        seqs, starts = make_tiles(query_lens, size, members)
        if seqs:  # (sequences without new tokens, e.g. ones the library attends, add none)
            plan.append((size, seqs, starts))
    return plan


def tile_sets(query_lens: list[int], device: torch.device) -> list[TileSet]:
    """``plan_tiles(query_lens)`` as launches on ``device`` (one upload)."""
    plans = plan_tiles(query_lens)
    arrays = upload(device, [(v, torch.int32) for _, seqs, starts in plans for v in (seqs, starts)])
    return [TileSet(size, arrays[2 * i], arrays[2 * i + 1]) for i, (size, _, _) in enumerate(plans)]


FP8_KV_DTYPE = torch.float8_e4m3fn


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the cache's dtype; an fp8 cache stores values clamped to its finite
    range (scale 1: an outlier saturates rather than overflowing)."""
    if dtype == FP8_KV_DTYPE:
        limit = torch.finfo(dtype).max
        return x.float().clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor viewed as uint8 (CPU index kernels do not take fp8); others as is."""
    return x.view(torch.uint8) if x.dtype == FP8_KV_DTYPE else x


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Scatter new keys/values ([T, Hkv, D]) into their cache slots."""
    num_blocks, block_size, heads, dim = k_cache.shape
    for x, cache in ((k, k_cache), (v, v_cache)):
        rows = _as_bytes(cache).view(num_blocks * block_size, heads, dim)
        rows.index_copy_(0, slots, _as_bytes(to_cache(x, cache.dtype)))


def gather_sequence_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first ``seq_len`` cached rows ([seq_len, Hkv, D]) of one sequence."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = _as_bytes(cache).index_select(0, block_table[:num_blocks].long()).view(cache.dtype)
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def _sequences(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each sequence of ``batch``: its rows of ``q``, and its queries [Lq, Hq, D], keys
    and values [Lk, Hkv, D] (all it has cached, the new ones included), in float32."""
    start = 0
    for b in range(batch.num_seqs):
        q_len, seq_len = batch.query_lens_host[b], batch.seq_lens_host[b]
        rows = slice(start, start + q_len)
        kb = gather_sequence_kv(k_cache, batch.block_tables[b], seq_len).float()
        vb = gather_sequence_kv(v_cache, batch.block_tables[b], seq_len).float()
        yield rows, q[rows].float(), kb, vb
        start += q_len


def _visible(
    q_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[Lq, Lk] True where a query (the sequence's last Lq tokens) sees a key."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible &= k_pos > q_pos - sliding_window
    return visible


def paged_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Write k/v into the cache, then attend. q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D].

    With ``sliding_window`` w, the token at position p sees keys at positions
    p - w + 1 .. p (Hugging Face's convention for Mistral). The scores are written out
    in float32 ([Hq, Lq, Lk]): the oracle of the kernels' tests, not a fast path.
    """
    write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
    out = torch.empty_like(q)
    heads_per_kv = q.shape[1] // k.shape[1]
    for rows, qb, kb, vb in _sequences(q, k_cache, v_cache, batch):
        kb = kb.repeat_interleave(heads_per_kv, dim=1)  # [Lk, Hq, D]
        vb = vb.repeat_interleave(heads_per_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale  # [Hq, Lq, Lk]
        visible = _visible(qb.shape[0], kb.shape[0], sliding_window, q.device)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[rows] = torch.einsum("hqk,khd->qhd", probs, vb).to(q.dtype)
    return out


def paged_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The reference's contract and float32 math through torch's fused SDPA: what the
    engine runs where the Triton kernels do not (the CPU).

    Why: the reference writes out every score; SDPA does not, and skips the keys a
    causal prompt cannot see. On a 2-core CPU shared with other jobs, SmolLM2-135M
    (9 query heads, 3 KV, 64 dims): a 3,800-token prompt's prefill 4.7 s instead of
    17.9 s, decoding at that context 8.0 instead of 7.0 tokens/s; one layer's
    1,024-token prompt 16-20 ms instead of 143-191 ms.
    """
    write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
    out = torch.empty_like(q)
    heads_per_kv = q.shape[1] // k.shape[1]
    for rows, qb, kb, vb in _sequences(q, k_cache, v_cache, batch):
        q_len, seq_len = qb.shape[0], kb.shape[0]
        if q_len == 0:
            continue
        if heads_per_kv > 1 and not _SDPA_TAKES_GROUPS:  # (torch 2.4)
            kb, vb = kb.repeat_interleave(heads_per_kv, 1), vb.repeat_interleave(heads_per_kv, 1)
        # A whole prompt is causal as SDPA aligns it (first query, first key); one
        # query sees every key; else the mask says which keys each query sees.
        causal = q_len == seq_len and sliding_window is None
        everything = q_len == 1 and (sliding_window is None or seq_len <= sliding_window)
        mask = None if causal or everything else _visible(q_len, seq_len, sliding_window, q.device)
        grouped = {"enable_gqa": True} if kb.shape[1] != qb.shape[1] else {}
        # [1, H, L, D] views of the [L, H, D] rows
        qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (qb, kb, vb))
        attended = torch.nn.functional.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=causal, scale=scale, **grouped
        )
        out[rows] = attended[0].transpose(0, 1).to(q.dtype)
    return out


# SDPA reads grouped keys as they are from torch 2.5 (``enable_gqa``); mii takes 2.4.
_SDPA_TAKES_GROUPS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def _rotated(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k with the rotary embedding applied (as they are when ``cos_sin`` is None)."""
    from mii.ops.rotary import apply_rotary_reference

    if cos_sin is None:
        return q, k
    # An fp8 cache takes rotated keys straight from float32, as the Triton kernel
    # does: a detour through bf16 rounds twice and can land one fp8 step away.
    k_in = k.float() if k_cache.dtype == FP8_KV_DTYPE else k
    return apply_rotary_reference(q, positions, cos_sin), apply_rotary_reference(
        k_in, positions, cos_sin
    )


def rotary_paged_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """Rotary embedding (skipped when ``cos_sin`` is None), cache write, attention:
    the reference's (``fused``: SDPA's, :func:`paged_attention_sdpa`).

    This is the contract of the fused GPU path: the Triton version
    (``ops.triton_attention.paged_attention_triton``) takes the same arguments.
    """
    q, k = _rotated(q, k, positions, cos_sin, k_cache)
    attend = paged_attention_sdpa if fused else paged_attention_reference
    return attend(q, k, v, k_cache, v_cache, batch, scale, sliding_window)
