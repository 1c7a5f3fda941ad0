"""The hash that names a KV block's whole prefix (prefix caching).

A block's hash is BLAKE2b over (the previous block's hash, or the cache salt
for the first block) + the block's token ids as little-endian int64, truncated
to 128 bits. Chaining makes one hash stand for every token before the block's
end, so equal hashes mean equal prefixes. At 128 bits a collision among even
2**40 cached blocks has probability below 2**-48: practically impossible.
BLAKE2b is in Python's standard library (hashlib, C) and costs about a
microsecond per 16-token block.
"""

from __future__ import annotations

import hashlib
from array import array

HASH_BYTES = 16  # 128-bit digests


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a block of ``token_ids`` that follows the prefix hashed as ``parent``."""
    digest = hashlib.blake2b(parent, digest_size=HASH_BYTES)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def cache_salt(*parts: object) -> bytes:
    """The root of every chain: what else the KV depends on (model, revision,
    dtypes), so that blocks of different engines could never be confused."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=HASH_BYTES).digest()
