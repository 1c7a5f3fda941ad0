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

Host time (issue 17: caching should add < 5 % to the scheduler's step): a
prompt's block hashes are computed at intake (``hash_prompt``); commit registers
the blocks of the pass's prompt chunks only, so a decode step costs nothing
extra; a sequence's generated blocks are hashed and registered in one go when
it lets its blocks go (``free``: it ended or was preempted); a running
sequence's blocks in flight are tracked by one entry, its next unregistered
prompt block. docs/performance.md has the numbers.

Invariants (``check_invariants``): a block's reference count is the number of
block tables holding it; a block is free (in exactly one of the two free
lists) iff its count is 0; the hash table and the blocks' hashes agree; a
sequence's blocks past its registered ones have no hash; the frontiers in
flight are those of the running sequences.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from itertools import islice

import torch

from mii.engine.prefix_hash import chain_hashes
from mii.engine.sequence import Sequence
from mii.errors import InvalidRequestError
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
        self._hashes: list[bytes | None] = [None] * num_blocks  # of its cached content
        self._plain: deque[int] = deque(range(num_blocks))  # free, nothing cached
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free, LRU first
        self._by_hash: dict[bytes, int] = {}
        # hash -> how many running sequences compute that block next (track_in_flight)
        self._frontiers: dict[bytes, int] = {}
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

    @property
    def num_tokens(self) -> int:
        """Tokens the whole pool holds: the longest sequence it can ever keep."""
        return self.num_blocks * self.block_size

    def can_fit_alone(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` fits in the whole, empty pool."""
        return num_tokens <= self.num_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq``'s block table so that ``num_new_tokens`` more tokens fit."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed <= 0:
            return
        if needed > self.num_free:
            raise RuntimeError(f"asked for {needed} KV blocks with {self.num_free} free")
        if self.prefix_caching and seq.num_registered_blocks < seq.in_flight_until:
            # A prompt block completed by a one-token chunk (not registered at commit:
            # decode chunks are not looked at there) is registered as the sequence
            # grows past it, before admission looks for it in this same pass.
            self.register(seq)
        for _ in range(needed):
            block = self._take()
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``. Blocks no other sequence holds become free;
        those with cached content stay findable until evicted (the sequence's last
        blocks are the first evicted: released in reverse order)."""
        if self.prefix_caching:
            # What it generated (and computed) is made findable now, hashed in one go:
            # nobody can send its generated text in a prompt before it ends.
            self.register(seq)
            if seq.num_registered_blocks < seq.in_flight_until:
                self._drop_frontier(seq.block_hashes[seq.num_registered_blocks])
        seq.in_flight_until = 0
        refs, hashes = self._refs, self._hashes
        for block in reversed(seq.block_table):
            refs[block] -= 1
            if refs[block] == 0:
                if hashes[block] is None:
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

    def hash_prompt(self, seq: Sequence) -> None:
        """Compute the chained hashes of ``seq``'s full prompt blocks now, when the
        request is taken in (engine/intake.py), so that the engine's step only looks
        them up. Without prefix caching, nothing."""
        if self.prefix_caching and not seq.block_hashes:
            seq.block_hashes = chain_hashes(self.cache_salt, seq.prompt_token_ids, self.block_size)

    def _hash_upto(self, seq: Sequence, end: int) -> int:
        """Hash ``seq``'s full blocks before block ``end`` that are not hashed yet, as
        far as its known tokens go (a PENDING_TOKEN is still on the device); returns
        how many of its blocks are hashed. Hashes are kept on the sequence: its tokens
        never change once known. A prompt's are there from intake (``hash_prompt``);
        generated blocks are hashed here once, in one go when it ends."""
        hashes, size = seq.block_hashes, self.block_size
        have = len(hashes)
        if have < end:
            tokens = seq.token_ids[have * size : end * size]
            if seq.pending_row is not None and tokens and min(tokens) < 0:
                tokens = tokens[: tokens.index(min(tokens))]  # hash up to the token not known
            hashes += chain_hashes(hashes[-1] if have else self.cache_salt, tokens, size)
        return len(hashes)

    def _block_hash(self, seq: Sequence, index: int) -> bytes | None:
        """The chained hash of ``seq``'s full block ``index`` (None while it is not
        full or one of its tokens is still on the device)."""
        return seq.block_hashes[index] if index < self._hash_upto(seq, index + 1) else None

    def attach_prefix(self, seq: Sequence) -> int:
        """Give a sequence without blocks the longest chain of cached blocks that
        matches its tokens (never its last token: that one must run to give logits);
        returns the number of tokens it no longer computes."""
        if not self.prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        reusable = (seq.num_tokens - 1) // self.block_size
        hashes = seq.block_hashes
        if len(hashes) < reusable:
            self._hash_upto(seq, reusable)
        attached = []
        find = self._by_hash.get
        for digest in islice(hashes, reusable):
            block = find(digest)
            if block is None:
                break
            attached.append(block)
        refs, cached_free = self._refs, self._cached_free
        for block in attached:
            if refs[block] == 0:
                del cached_free[block]
            refs[block] += 1
        seq.block_table = attached
        seq.num_registered_blocks = len(attached)
        seq.num_computed = len(attached) * self.block_size
        return seq.num_computed

    def uncached_tokens(self, seq: Sequence, at_most: int) -> int:
        """The tokens a waiting sequence would compute once ``attach_prefix`` gave it
        its cached prefix, when that is at most ``at_most``; else a larger number (the
        lookup stops as soon as it knows). Attaches nothing: the scheduler asks it of
        sequences it may not admit (a chat turn whose history is cached is short)."""
        total = seq.num_tokens
        if not self.prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return total  # (prompt logprobs: computed whole, as attach_prefix does)
        reusable = (total - 1) // self.block_size
        needed = max(0, -(-(total - at_most) // self.block_size))  # blocks that must be cached
        hashed = min(self._hash_upto(seq, reusable), reusable)  # (intake hashes every block)
        if needed > hashed:
            return total
        cached = self._by_hash
        if needed and seq.block_hashes[needed - 1] not in cached:  # long prompts stop here
            return total
        found = 0
        for digest in islice(seq.block_hashes, hashed):
            if digest not in cached:
                break
            found += 1
        return total - found * self.block_size

    def reset_counts(self) -> None:
        """Zero the lookup counters (after the engine's own warm-up request)."""
        self.query_tokens = self.hit_tokens = 0

    def admitted(self, seq: Sequence) -> None:
        """Count an admitted sequence's lookup (its prompt tokens, and those it found:
        its ``cached_tokens``) and track the prompt blocks it computes
        (``track_in_flight``). Counted once per sequence, as ``Response.cached_tokens``
        and ``/metrics`` count them: not again when a preempted sequence is recomputed,
        nor for a request asking for prompt logprobs (computed whole, never looked up)."""
        if not self.prefix_caching:
            return
        if seq.num_preemptions == 0 and seq.params.prompt_logprobs is None:
            self.query_tokens += seq.prompt_len
            self.hit_tokens += seq.num_computed
        self.track_in_flight(seq)

    def track_in_flight(self, seq: Sequence) -> None:
        """Record, for a sequence just admitted, that it computes its full prompt
        blocks from its first unregistered one on: that block (its frontier) is in
        flight until registered, then the next one, up to the prompt's last full
        block. Another sequence whose next block is a frontier waits for it
        (``waits_for_prefix``) instead of computing it too. O(1) per admission and per
        registration: a block past the frontier cannot be another sequence's next
        block without the frontier's block being cached (chained hashes), except
        when both compute the same prefix at once, which this check prevents."""
        if not self.prefix_caching:
            return
        end = self._hash_upto(seq, seq.prompt_len // self.block_size)  # built directly: no intake
        seq.in_flight_until = end
        if seq.num_registered_blocks < end:
            digest = seq.block_hashes[seq.num_registered_blocks]
            self._frontiers[digest] = self._frontiers.get(digest, 0) + 1

    def _drop_frontier(self, digest: bytes) -> None:
        count = self._frontiers[digest] - 1
        if count:
            self._frontiers[digest] = count
        else:
            del self._frontiers[digest]

    def waits_for_prefix(self, seq: Sequence) -> bool:
        """Whether the first block a waiting ``seq`` would compute itself (after its
        cached prefix) is being computed by a running sequence: it had better wait
        for it than compute it too (n > 1, identical prompts arriving together)."""
        if not self._frontiers or seq.params.prompt_logprobs is not None:
            return False  # nothing in flight (and nothing cached without prefix caching)
        digest = self.next_block_hash(seq)
        return digest is not None and digest in self._frontiers

    def next_block_hash(self, seq: Sequence) -> bytes | None:
        """The hash of the first block ``seq`` would compute itself (None: no full block
        of known tokens left before its last token)."""
        index = len(seq.block_table)
        if index >= (seq.num_tokens - 1) // self.block_size:
            return None
        return self._block_hash(seq, index)

    def register(self, seq: Sequence) -> None:
        """Make ``seq``'s newly computed full blocks findable (after a pass is
        launched: its writes precede any later pass's reads on the device). Called
        at commit for sequences that computed a chunk of prompt, when a sequence
        grows past a prompt block its one-token chunk completed (``allocate``) and
        when it lets its blocks go (``free``)."""
        start = seq.num_registered_blocks
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        if start >= full:
            return
        hashes = seq.block_hashes
        # a token still on the device: the blocks before it (the next call does the rest)
        full = self._hash_upto(seq, full) if len(hashes) < full else full
        if start >= full:
            return
        by_hash, block_hash = self._by_hash, self._hashes
        # Its unregistered blocks have no hash (check_invariants): only another block
        # holding the same prefix (computed at the same time) can be in the way; the
        # first stays the one found, and this one is not registered.
        for digest, block in zip(hashes[start:full], seq.block_table[start:full]):
            if digest not in by_hash:
                by_hash[digest] = block
                block_hash[block] = digest
        seq.num_registered_blocks = full
        if start < seq.in_flight_until:  # its frontier moves on
            self._drop_frontier(hashes[start])
            if full < seq.in_flight_until:
                self._frontiers[hashes[full]] = self._frontiers.get(hashes[full], 0) + 1

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
        hash_of = {b: h for b, h in enumerate(self._hashes) if h is not None}
        assert not plain & hash_of.keys(), "a plain free block has a hash"
        assert cached <= hash_of.keys(), "a cached block lost its hash"
        assert hash_of == {b: h for h, b in self._by_hash.items()}, (
            "the hash table and the blocks' hashes disagree"
        )
        frontiers: dict[bytes, int] = {}
        for seq in seqs:
            registered = seq.num_registered_blocks
            # what lets register() take a block without looking for a hash of its own
            assert not hash_of.keys() & set(seq.block_table[registered:]), (
                "a block past a sequence's registered ones has a hash"
            )
            if registered < seq.in_flight_until:
                digest = seq.block_hashes[registered]
                frontiers[digest] = frontiers.get(digest, 0) + 1
        assert frontiers == self._frontiers, "blocks in flight disagree with the sequences"


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
    at full length would use. Never more than ``max_blocks_addressable``."""
    most = max_blocks_addressable(spec, block_size)
    if requested is not None:
        if requested > most:
            raise InvalidRequestError(
                f"num_kv_blocks={requested} is more than the attention kernels can address "
                f"({most} blocks of {block_size} tokens: one layer's cache must stay under "
                f"2**31 values); ask for at most {most}",
                field="num_kv_blocks",
            )
        return requested
    per_block = bytes_per_block(spec, block_size, dtype)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Leave room for activations of the largest forward pass.
        return min(most, max(1, int(free * memory_fraction) // per_block))
    useful = blocks_for(max_length, block_size) * max_num_seqs
    return min(most, max(blocks_for(max_length, block_size), min(useful, cpu_bytes // per_block)))


def max_blocks_addressable(spec: KVCacheSpec, block_size: int) -> int:
    """The most blocks one layer's K (or V) cache may hold: the kernels address it
    with int32 offsets (block index times the block's values, ops/triton_attention.py),
    so it stays under 2**31 values. A small model's fp8 cache on a large GPU would
    pass that (Llama-3.2-1B: 8 KV heads of 64, 262,143 blocks of 16 = 4.2M tokens)."""
    return (2**31 - 1) // (block_size * spec.num_kv_heads * spec.head_dim)
