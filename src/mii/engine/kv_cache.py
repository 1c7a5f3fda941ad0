"""The blocked KV cache: a pool of fixed-size blocks, a free list, per-sequence
block tables, and automatic prefix caching.

Block tables are append-only while a sequence runs; a sequence's blocks are
released at once when it finishes, is aborted or is preempted. The scheduler
speaks to ``BlockManager`` only through sequences and token counts; it never
sees block ids.

Prefix caching (``prefix_caching=True``): every full block whose KV has been
computed is registered under a hash chained over the hash of the block before
it and the block's token ids (``engine/prefix_hash.py``), so a hash names a
whole prefix. A new sequence attaches the longest chain of registered blocks
that matches its tokens (``attach_prefix``) and computes only the rest.
Blocks are reference-counted: a block in any sequence's table is never handed
out again; a released block keeps its KV and its hash in an LRU list, and is
reused by the next request with that prefix or, when memory is needed,
evicted least-recently-used first (blocks without cached content go first).

Invariants (``check_invariants``): a block's reference count is the number of
block tables holding it; a block is free (in exactly one of the two free
lists) iff its count is 0; the hash table and the blocks' hashes agree.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

import torch

from mii.engine.prefix_hash import block_hash
from mii.engine.sequence import Sequence
from mii.models.base import KVCacheSpec


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Hands out cache blocks to sequences as they grow, and (with prefix caching)
    shares the full blocks of common prefixes between them."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        prefix_caching: bool = False,
        cache_salt: bytes = b"",
    ) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # What else the KV depends on (model, dtypes): the root of every hash chain.
        self.cache_salt = cache_salt
        self._refs = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._plain: deque[int] = deque(range(num_blocks))  # free, nothing cached
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free, LRU first
        self._by_hash: dict[bytes, int] = {}
        # hash -> how many running sequences are computing that block (track_in_flight)
        self._in_flight: dict[bytes, int] = {}
        self.query_tokens = 0  # prompt tokens looked up in the cache
        self.hit_tokens = 0  # of those, found

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (cached ones are evicted when taken)."""
        return len(self._plain) + len(self._cached_free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by sequences, 0..1."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold KV for ``num_new_tokens`` more tokens."""
        total = blocks_for(seq.num_computed + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def tokens_that_fit(self, seq: Sequence, wanted: int) -> int:
        """How many of ``wanted`` new tokens the free blocks (plus slack in the
        sequence's last block) can hold."""
        capacity = (len(seq.block_table) + self.num_free) * self.block_size
        return max(0, min(wanted, capacity - seq.num_computed))

    def can_fit_alone(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` fits in the whole, empty pool."""
        return blocks_for(num_tokens, self.block_size) <= self.num_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq``'s block table so that ``num_new_tokens`` more tokens fit."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"asked for {needed} KV blocks with {self.num_free} free")
        for _ in range(needed):
            block = self._take()
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``. Blocks no other sequence holds become free;
        those with cached content stay findable until evicted (the sequence's last
        blocks are the first evicted: released in reverse order)."""
        for index in range(seq.num_registered_blocks, seq.in_flight_until):
            self._land(seq, index)
        seq.in_flight_until = 0
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hashes[block] is None:
                    self._plain.append(block)
                else:
                    self._cached_free[block] = None  # most recently used: evicted last
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _take(self) -> int:
        """A free block for new KV: one with nothing cached, else the least recently
        used cached one (whose hash is forgotten)."""
        if self._plain:
            return self._plain.popleft()
        block, _ = self._cached_free.popitem(last=False)
        del self._by_hash[self._hashes[block]]
        self._hashes[block] = None
        return block

    # ----- prefix caching -----------------------------------------------------

    def _block_hash(self, seq: Sequence, index: int) -> bytes | None:
        """The chained hash of ``seq``'s full block ``index`` (None while one of its
        tokens is still on the device). Hashes are kept on the sequence: its tokens
        never change once known."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) <= index:
            i = len(hashes)
            tokens = seq.token_ids[i * size : (i + 1) * size]
            if len(tokens) < size or min(tokens) < 0:  # not full, or PENDING_TOKEN
                return None
            hashes.append(block_hash(hashes[i - 1] if i else self.cache_salt, tokens))
        return hashes[index]

    def attach_prefix(self, seq: Sequence) -> int:
        """Give a sequence without blocks the longest chain of cached blocks that
        matches its tokens (never its last token: that one must run to give logits);
        returns the number of tokens it no longer computes."""
        if not self.prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        reusable = (seq.num_tokens - 1) // self.block_size
        attached = []
        for index in range(reusable):
            digest = self._block_hash(seq, index)
            block = self._by_hash.get(digest) if digest is not None else None
            if block is None:
                break
            attached.append(block)
        for block in attached:
            if self._refs[block] == 0:
                del self._cached_free[block]
            self._refs[block] += 1
        seq.block_table = attached
        seq.num_registered_blocks = len(attached)
        seq.num_computed = len(attached) * self.block_size
        return seq.num_computed

    def count_lookup(self, seq: Sequence) -> None:
        """Count an admitted sequence's lookup (its tokens, and those it found)."""
        if self.prefix_caching:
            self.query_tokens += seq.num_tokens
            self.hit_tokens += seq.num_computed

    def track_in_flight(self, seq: Sequence) -> None:
        """Record, for a sequence just admitted, the full prompt blocks it will compute
        (not registered yet): another sequence needing one of them waits for it
        (``in_flight``) instead of computing it too. Undone block by block as they
        are registered, and wholly when the sequence releases its blocks."""
        if not self.prefix_caching:
            return
        end = seq.num_registered_blocks
        for index in range(seq.num_registered_blocks, seq.prompt_len // self.block_size):
            digest = self._block_hash(seq, index)
            if digest is None:
                break
            self._in_flight[digest] = self._in_flight.get(digest, 0) + 1
            end = index + 1
        seq.in_flight_until = end

    def in_flight(self, digest: bytes | None) -> bool:
        """Whether some running sequence is computing the block named ``digest``."""
        return digest is not None and digest in self._in_flight

    def _land(self, seq: Sequence, index: int) -> None:
        """Block ``index`` of ``seq`` is no longer in flight (registered or released)."""
        if index < seq.in_flight_until:
            digest = seq.block_hashes[index]
            count = self._in_flight[digest] - 1
            if count:
                self._in_flight[digest] = count
            else:
                del self._in_flight[digest]

    def next_block_hash(self, seq: Sequence) -> bytes | None:
        """The hash of the first block ``seq`` would compute itself (None: no full block
        of known tokens left before its last token)."""
        index = len(seq.block_table)
        if index >= (seq.num_tokens - 1) // self.block_size:
            return None
        return self._block_hash(seq, index)

    def register(self, seq: Sequence) -> None:
        """Make ``seq``'s newly computed full blocks findable (after a pass is
        launched: its writes precede any later pass's reads on the device)."""
        full = seq.num_computed // self.block_size
        while seq.num_registered_blocks < full:
            index = seq.num_registered_blocks
            digest = self._block_hash(seq, index)
            if digest is None:
                return  # a token still on the device: the next pass registers it
            block = seq.block_table[index]
            # Another block may hold the same prefix already (computed at the same
            # time): the first stays the one found, this one is not registered.
            if self._hashes[block] is None and digest not in self._by_hash:
                self._by_hash[digest] = block
                self._hashes[block] = digest
            self._land(seq, index)
            seq.num_registered_blocks += 1

    def reset_prefix_cache(self) -> None:
        """Forget the cached content of every free block (blocks in use keep theirs):
        the next requests find only what running sequences hold. For benchmarks that
        must not carry one workload's prefixes into the next."""
        while self._cached_free:
            block, _ = self._cached_free.popitem(last=False)
            del self._by_hash[self._hashes[block]]
            self._hashes[block] = None
            self._plain.append(block)

    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless reference counts, free lists and the hash
        table agree with the block tables of ``seqs`` (every live sequence)."""
        held = [0] * self.num_blocks
        for seq in seqs:
            for block in seq.block_table:
                held[block] += 1
        assert held == self._refs, "reference counts differ from the block tables"
        plain, cached = set(self._plain), set(self._cached_free)
        assert len(plain) == len(self._plain) and not plain & cached, "a block freed twice"
        free = {b for b in range(self.num_blocks) if self._refs[b] == 0}
        assert plain | cached == free, "the free lists are not the unreferenced blocks"
        assert all(self._hashes[b] is None for b in plain), "a plain free block has a hash"
        assert all(self._hashes[b] is not None for b in cached), "a cached block lost its hash"
        assert {b: h for b, h in enumerate(self._hashes) if h is not None} == {
            b: h for h, b in self._by_hash.items()
        }, "the hash table and the blocks' hashes disagree"
        in_flight: dict[bytes, int] = {}
        for seq in seqs:
            for index in range(seq.num_registered_blocks, seq.in_flight_until):
                digest = seq.block_hashes[index]
                in_flight[digest] = in_flight.get(digest, 0) + 1
        assert in_flight == self._in_flight, "blocks in flight disagree with the sequences"


def allocate_kv_tensors(
    spec: KVCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, key and value caches of shape [num_blocks, block_size, Hkv, D]."""
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(spec.num_layers)
    ]


def bytes_per_block(spec: KVCacheSpec, block_size: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * element


def choose_num_blocks(
    spec: KVCacheSpec,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    requested: int | None,
    memory_fraction: float,
    cpu_bytes: int,
    max_length: int,
    max_num_seqs: int,
) -> int:
    """Pool size: ``requested`` if given; on CUDA a fraction of free memory (after
    the weights are loaded); on CPU ``cpu_bytes`` but no more than every sequence
    at full length would use."""
    if requested is not None:
        return requested
    per_block = bytes_per_block(spec, block_size, dtype)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Leave room for activations of the largest forward pass.
        return max(1, int(free * memory_fraction) // per_block)
    useful = blocks_for(max_length, block_size) * max_num_seqs
    return max(blocks_for(max_length, block_size), min(useful, cpu_bytes // per_block))
