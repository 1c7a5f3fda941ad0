"""A token's own bytes, for the ``bytes`` of chat logprobs.

A token that holds part of a multi-byte character (an emoji split over two or
three byte-level tokens) decodes alone to U+FFFD; the UTF-8 of that text is not
the token's bytes, and clients rebuild characters from ``bytes``. Such tokens'
bytes are read from the vocabulary instead: byte-fallback pieces (``<0xE2>``,
SentencePiece) name their byte, byte-level BPE pieces (GPT-2, Llama 3, SmolLM2)
spell each byte as one printable character of GPT-2's fixed table.
"""

from __future__ import annotations

import functools
import re
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """Character -> byte of byte-level BPE vocabularies: the printable bytes stand
    for themselves, the others for the code points from 256 up, in byte order
    (GPT-2's table, which every byte-level BPE tokenizer shares)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def piece_bytes(piece: str) -> bytes | None:
    """The bytes a vocabulary ``piece`` stands for, when it spells bytes (a byte
    fallback piece or a byte-level BPE piece); None otherwise."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    table = _byte_level_table()
    if piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return None


def token_bytes(tokenizer: Any, token_ids: list[int], texts: list[str]) -> list[list[int]]:
    """Each token's bytes given its decoded ``texts``: the text's UTF-8, or for a
    token that decodes to U+FFFD, the bytes its vocabulary piece spells."""
    partial = [i for i, text in enumerate(texts) if "\ufffd" in text]
    pieces = tokenizer.convert_ids_to_tokens([token_ids[i] for i in partial]) if partial else []
    out = [list(text.encode()) for text in texts]
    for i, piece in zip(partial, pieces):
        raw = piece_bytes(piece) if isinstance(piece, str) else None
        if raw is not None:
            out[i] = list(raw)
    return out
