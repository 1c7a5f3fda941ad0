"""Keeping constrained output valid UTF-8 where the grammar engine does not.

xgrammar (0.2.x) checks UTF-8 byte by byte as a matcher accepts tokens: it
refuses overlong forms, code points past U+10FFFF and stray continuation bytes,
but not the UTF-8 form of a surrogate (U+D800..U+DFFF: the bytes ED, A0..BF,
80..BF). Its JSON string grammar, ``.`` and every negated character class
(``[^"]``) accept them, so a constrained answer can hold those three bytes,
which Python decodes as three U+FFFD: the text breaks ``maxLength`` or a
``pattern`` and carries replacement characters although the grammar accepted
it. xgrammar has no option to refuse them (no flag in ``TokenizerInfo``,
``GrammarCompiler`` or its builtin grammars), and rewriting every user grammar's
character classes is not possible in general, so the engine masks them itself.

A surrogate is recognisable at the token level: the byte ED followed by one of
A0..BF, either inside one token's bytes or across two tokens (one ending in the
lead byte ED, the next starting with A0..BF). ``Utf8Guard`` holds, per
tokenizer, two packed masks in xgrammar's bitmask layout (bit ``t % 32`` of
int32 word ``t // 32`` set: token ``t`` allowed), ANDed on the host into the
rows the grammar matchers filled (``engine/grammar_mask.py``):

- ``keep``: every token except those whose bytes contain ED A0..BF (always
  forbidden in a constrained row);
- ``keep_after_lead``: ``keep`` less the tokens whose bytes start with A0..BF
  (also forbidden while the row's output ends in a lone lead byte ED),

and, per token, what its bytes do to "the output ends in a lone ED" (set,
cleared, or unchanged for a token without bytes), which ``accept`` tracks.

Can a row be left without any token? Only when the grammar itself admits
nothing but a surrogate there (e.g. a user grammar ``[\\ud800-\\udfff]``, or a
class whose only code points after ED are surrogates): every valid UTF-8
continuation of ED (80..9F) and every character not starting with ED stay
allowed, and xgrammar offers a lone ED only as the prefix of some character the
grammar allows. Such a row falls back to its grammar's own mask (the grammar
asked for that text; a row with no allowed token would sample garbage).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# The first two bytes of a UTF-8-encoded surrogate (U+D800..U+DFFF).
_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
_LEAD = 0xED  # the lead byte of U+D000..U+DFFF
_SECOND = range(0xA0, 0xC0)  # a second byte after ED that makes a surrogate

# What a token's bytes do to "the output ends in a lone lead byte ED".
CLEARS, SETS, KEEPS = 0, 1, 2


class Utf8Guard:
    """The surrogate masks of one tokenizer's vocabulary (see the module's doc).

    ``token_bytes``: each token's bytes as the grammar engine sees them
    (xgrammar's ``TokenizerInfo.decoded_vocab``); ``vocab_size``: the width of the
    grammar bitmask (the model's logits width; missing tokens have no bytes)."""

    def __init__(self, token_bytes: Sequence[bytes], vocab_size: int) -> None:
        words = (vocab_size + 31) // 32
        keep = np.zeros(words * 32, dtype=bool)
        keep[:vocab_size] = True  # the bits past the vocabulary stay 0 (no such token)
        after_lead = keep.copy()
        effect = bytearray([KEEPS]) * vocab_size
        for token, text in enumerate(token_bytes[:vocab_size]):
            if not text:
                continue
            effect[token] = SETS if text[-1] == _LEAD else CLEARS
            if text[0] in _SECOND:
                after_lead[token] = False
            if _LEAD in text and _SURROGATE.search(text):
                keep[token] = False
        after_lead &= keep
        # little bit order: token 8k+i is bit i of byte k, so of int32 word t // 32
        # on a little-endian host, xgrammar's layout
        self.keep = np.packbits(keep, bitorder="little").view(np.int32)
        self.keep_after_lead = np.packbits(after_lead, bitorder="little").view(np.int32)
        self._effect = bytes(effect)
        self.vocab_size = vocab_size

    def after(self, token: int, lone_lead: bool) -> bool:
        """Whether the output ends in a lone lead byte ED once ``token`` is appended
        to output for which that was ``lone_lead``."""
        effect = self._effect[token] if 0 <= token < self.vocab_size else KEEPS
        return lone_lead if effect == KEEPS else effect == SETS

    def restrict(self, bitmask: np.ndarray, lone_lead: np.ndarray) -> np.ndarray:
        """AND the packed rows ``bitmask`` [R, ceil(V/32)] (int32, in place) with
        ``keep``, and the rows where ``lone_lead`` (bool [R]) with
        ``keep_after_lead``. Returns the indices of rows left with no token at all:
        the caller refills those from their grammar (see the module's doc)."""
        np.bitwise_and(bitmask, self.keep, out=bitmask)
        if lone_lead.any():
            bitmask[lone_lead] &= self.keep_after_lead
        return np.flatnonzero(~bitmask.any(axis=1))
