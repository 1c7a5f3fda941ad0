"""The hash that names a KV block's whole prefix (prefix caching).

A block's hash is BLAKE2b-128 over (the previous block's hash, or the cache salt
for the first block) followed by the block's token ids as 32-bit native-endian
integers (token ids are < 2**31: vocabularies are far smaller; the hashes never
leave the process). Chaining makes one hash stand for every token before the
block's end, so equal hashes mean equal prefixes. At 128 bits a collision among
even 2**40 cached blocks has probability below 2**-48: practically impossible,
and BLAKE2b is a cryptographic hash, so a client cannot craft one either.
BLAKE2b is in Python's standard library (hashlib, C); a 16-token block (16-byte
parent + 64 bytes of ids) is one BLAKE2b compression, about half a microsecond
with Python's call overhead.

A prompt's hashes are computed once, when its request is taken in
(``chain_hashes``, engine/intake.py), not in the engine's step; a generated
block is hashed once, when it is registered (``block_hash``). Both give the same
digests (tests/test_prefix_hash_intake.py).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from functools import lru_cache

HASH_BYTES = 16  # 128-bit digests
_ID_BYTES = 4  # one token id: a 32-bit integer in native byte order
# An empty BLAKE2b-128 state: copying it is cheaper than parsing digest_size again.
_EMPTY = hashlib.blake2b(digest_size=HASH_BYTES)


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The hash of a block of ``token_ids`` that follows the prefix hashed as ``parent``."""
    state = _EMPTY.copy()
    state.update(parent + _packer(len(token_ids))(*token_ids))
    return state.digest()


def chain_hashes(parent: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained hashes of every full block of ``token_ids`` (the first block
    follows the prefix hashed as ``parent``): ``block_hash`` block by block, with
    the ids converted to bytes once."""
    data = _packer(len(token_ids))(*token_ids)
    step = block_size * _ID_BYTES
    empty = _EMPTY.copy
    hashes = []
    append = hashes.append
    for end in range(step, len(data) + 1, step):
        state = empty()
        state.update(parent + data[end - step : end])
        parent = state.digest()
        append(parent)
    return hashes


@lru_cache(maxsize=512)
def _packer(count: int) -> Callable[..., bytes]:
    """Packs ``count`` token ids into bytes (a cached ``struct.Struct``: twice as fast
    as ``array("i", ids).tobytes()`` and the same bytes)."""
    return struct.Struct(f"={count}i").pack


def cache_salt(*parts: object) -> bytes:
    """The root of every chain: what else the KV depends on (model, revision,
    dtypes), so that blocks of different engines could never be confused."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=HASH_BYTES).digest()
