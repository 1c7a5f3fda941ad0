"""Keeping constrained output valid UTF-8 where the grammar engine does not.

xgrammar (0.2.x) checks UTF-8 byte by byte as a matcher accepts tokens, but not
everywhere and not fully:

- no grammar of it refuses the UTF-8 form of a surrogate (U+D800..U+DFFF: the
  bytes ED, A0..BF, 80..BF): JSON strings, ``.`` and negated classes (``[^"]``)
  accept them;
- the character classes of a JSON schema's ``pattern`` (and so a ``maxLength``,
  which the engine turns into a pattern: ``engine/constraints.py``) also accept
  the overlong three- and four-byte forms (E0 80..9F xx, F0 80..8F xx xx), which
  its other grammars refuse.

Such bytes decode to several U+FFFD in Python: the text breaks ``maxLength`` or a
``pattern`` and carries replacement characters although the grammar accepted it.
xgrammar has no option to refuse them, and rewriting every user grammar's
character classes is not possible in general, so the engine masks them itself.

UTF-8's well-formed byte sequences (Unicode 15, table 3-7) are a small automaton:
between tokens, a row's output is either complete or ends inside a character,
waiting for a continuation byte of one of a few ranges (eight states in all).
``Utf8Guard`` holds, per tokenizer:

- per state, the packed mask of the tokens whose bytes are well-formed after that
  state (xgrammar's bitmask layout: bit ``t % 32`` of int32 word ``t // 32`` set:
  token ``t`` allowed), ANDed on the host into the rows the grammar matchers
  filled (``engine/grammar_mask.py``);
- per state and token, the state after the token, which ``after`` tracks. A token
  without bytes (EOS, special tokens) is allowed in every state and changes none.

(Python's incremental UTF-8 decoder cannot serve as the automaton: it buffers
ED A0 as if a character could still follow.)

Can a row be left without any token? Only when the grammar itself admits nothing
but ill-formed bytes there (e.g. a user grammar ``[\\ud800-\\udfff]``): every
well-formed continuation of the row's output that the grammar allows stays
allowed. Such a row falls back to its grammar's own mask (the grammar asked for
that text; a row with no allowed token would sample garbage).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The states between tokens: the output is complete, or this many continuation
# bytes are missing (any of 80..BF), or it ends in a lead byte whose next byte has a
# narrower range (E0: A0..BF, else overlong; ED: 80..9F, else a surrogate; F0:
# 90..BF, else overlong; F4: 80..8F, else past U+10FFFF).
COMPLETE, MISSING_1, MISSING_2, MISSING_3, AFTER_E0, AFTER_ED, AFTER_F0, AFTER_F4 = range(8)
NUM_STATES = 8
_INVALID = -1


def _byte_table() -> np.ndarray:
    """[NUM_STATES, 256] the state after each byte in each state (table 3-7)."""
    table = np.full((NUM_STATES, 256), _INVALID, dtype=np.int8)
    table[COMPLETE, 0x00:0x80] = COMPLETE
    table[COMPLETE, 0xC2:0xE0] = MISSING_1
    table[COMPLETE, 0xE0] = AFTER_E0
    table[COMPLETE, 0xE1:0xF0] = MISSING_2
    table[COMPLETE, 0xED] = AFTER_ED
    table[COMPLETE, 0xF0] = AFTER_F0
    table[COMPLETE, 0xF1:0xF4] = MISSING_3
    table[COMPLETE, 0xF4] = AFTER_F4
    table[MISSING_1, 0x80:0xC0] = COMPLETE
    table[MISSING_2, 0x80:0xC0] = MISSING_1
    table[MISSING_3, 0x80:0xC0] = MISSING_2
    table[AFTER_E0, 0xA0:0xC0] = MISSING_1
    table[AFTER_ED, 0x80:0xA0] = MISSING_1
    table[AFTER_F0, 0x90:0xC0] = MISSING_2
    table[AFTER_F4, 0x80:0x90] = MISSING_2
    return table


_BYTE_TABLE = _byte_table().tolist()  # lists: the per-byte walk below is plain Python


def _transition(state: int, text: bytes) -> int:
    """The state after ``text`` is appended in ``state``; ``_INVALID`` if the bytes
    are not well-formed there."""
    for byte in text:
        state = _BYTE_TABLE[state][byte]
        if state == _INVALID:
            break
    return state


class Utf8Guard:
    """The well-formed-UTF-8 masks of one tokenizer's vocabulary (see the module's
    doc).

    ``token_bytes``: each token's bytes as the grammar engine sees them
    (xgrammar's ``TokenizerInfo.decoded_vocab``); ``vocab_size``: the width of the
    grammar bitmask (the model's logits width; missing tokens have no bytes)."""

    def __init__(self, token_bytes: Sequence[bytes], vocab_size: int) -> None:
        words = (vocab_size + 31) // 32
        # next_state[s, t]: the state after token t in state s (_INVALID: refused)
        next_state = np.full((NUM_STATES, words * 32), _INVALID, dtype=np.int8)
        next_state[:, :vocab_size] = np.arange(NUM_STATES, dtype=np.int8)[:, None]
        for token, text in enumerate(token_bytes[:vocab_size]):
            if not text:
                continue  # no bytes: allowed everywhere, changes nothing
            # (most tokens are ASCII, and only a token that starts with a continuation
            # byte can follow an incomplete character: a fast path for both)
            next_state[COMPLETE, token] = (
                COMPLETE if text.isascii() else _transition(COMPLETE, text)
            )
            if 0x80 <= text[0] < 0xC0:
                for state in range(1, NUM_STATES):
                    next_state[state, token] = _transition(state, text)
            else:
                next_state[1:, token] = _INVALID
        allowed = next_state != _INVALID
        allowed[:, vocab_size:] = False  # the bits past the vocabulary stay 0 (no such token)
        # little bit order: token 8k+i is bit i of byte k, so of int32 word t // 32
        # on a little-endian host, xgrammar's layout
        self.masks = np.packbits(allowed, axis=1, bitorder="little").view(np.int32)
        self._next_state = next_state[:, :vocab_size]
        self.vocab_size = vocab_size

    def after(self, token: int, state: int) -> int:
        """The state of the output once ``token`` is appended to output in ``state``
        (unchanged for a token without bytes or past the vocabulary; ``COMPLETE``
        if the token was not well-formed there: a grammar's own mask let it
        through, and the next character starts afresh)."""
        if not 0 <= token < self.vocab_size:
            return state
        return max(int(self._next_state[state, token]), COMPLETE)

    def restrict(self, bitmask: np.ndarray, states: np.ndarray) -> np.ndarray:
        """AND the packed rows ``bitmask`` [R, ceil(V/32)] (int32, in place) with the
        masks of their rows' ``states`` (int [R]). Returns the indices of rows left
        with no token at all: the caller refills those from their grammar (see the
        module's doc)."""
        first = states[0] if len(states) else COMPLETE
        if (states == first).all():  # the usual case (all complete): one broadcast row
            np.bitwise_and(bitmask, self.masks[first], out=bitmask)
        else:  # (a gathered [R, words] copy: rows mid-character are rare)
            np.bitwise_and(bitmask, self.masks[states], out=bitmask)
        return np.flatnonzero(~bitmask.any(axis=1))
