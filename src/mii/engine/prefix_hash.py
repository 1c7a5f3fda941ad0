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
from array import array
from collections.abc import Sequence

HASH_BYTES = 16  # 128-bit digests
_ID_BYTES = array("i").itemsize  # 4: one token id


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The hash of a block of ``token_ids`` that follows the prefix hashed as ``parent``."""
    data = parent + array("i", token_ids).tobytes()
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


def chain_hashes(parent: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained hashes of every full block of ``token_ids`` (the first block
    follows the prefix hashed as ``parent``): ``block_hash`` block by block, with
    the ids converted to bytes once."""
    data = array("i", token_ids).tobytes()
    step = block_size * _ID_BYTES
    blake2b = hashlib.blake2b
    hashes = []
    append = hashes.append
    for end in range(step, len(data) + 1, step):
        parent = blake2b(parent + data[end - step : end], digest_size=HASH_BYTES).digest()
        append(parent)
    return hashes


def cache_salt(*parts: object) -> bytes:
    """The root of every chain: what else the KV depends on (model, revision,
    dtypes), so that blocks of different engines could never be confused."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=HASH_BYTES).digest()
