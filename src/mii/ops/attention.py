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
    p - w + 1 .. p (Hugging Face's convention for Mistral).
    """
    write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
    out = torch.empty_like(q)
    heads_per_kv = q.shape[1] // k.shape[1]
    start = 0
    for b in range(batch.num_seqs):
        q_len, seq_len = batch.query_lens_host[b], batch.seq_lens_host[b]
        qb = q[start : start + q_len].float()  # [Lq, Hq, D]
        kb = gather_sequence_kv(k_cache, batch.block_tables[b], seq_len).float()  # [Lk, Hkv, D]
        vb = gather_sequence_kv(v_cache, batch.block_tables[b], seq_len).float()
        kb = kb.repeat_interleave(heads_per_kv, dim=1)  # [Lk, Hq, D]
        vb = vb.repeat_interleave(heads_per_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale  # [Hq, Lq, Lk]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, vb).to(q.dtype)
        start += q_len
    return out


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
) -> torch.Tensor:
    """Rotary embedding (skipped when ``cos_sin`` is None), cache write, attention.

    This is the contract of the fused GPU path: the Triton version
    (``ops.triton_attention.paged_attention_triton``) takes the same arguments.
    """
    from mii.ops.rotary import apply_rotary_reference

    if cos_sin is not None:
        q = apply_rotary_reference(q, positions, cos_sin)
        # An fp8 cache takes rotated keys straight from float32, as the Triton kernel
        # does: a detour through bf16 rounds twice and can land one fp8 step away.
        k_in = k.float() if k_cache.dtype == FP8_KV_DTYPE else k
        k = apply_rotary_reference(k_in, positions, cos_sin)
    return paged_attention_reference(q, k, v, k_cache, v_cache, batch, scale, sliding_window)
