"""The grammar mask of a batch (engine/grammar_mask.py), on the CPU and on CUDA
(skipped without one): only constrained rows change, exactly the tokens their
grammar forbids become -inf (ids past the tokenizer's vocabulary too), rows of
requests that ended are left alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mii.config import GenerateParams
from mii.engine import grammar_mask
from mii.engine.constraints import GrammarCache
from mii.engine.sequence import Sequence, SequenceStatus

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
PAD = 37  # LM-head rows past the tokenizer's vocabulary


def seq(cache: GrammarCache, **options) -> Sequence:
    params = GenerateParams.parse(**options)
    grammar = cache.get(params.constraint) if params.constraint else None
    matcher = grammar_mask.new_matcher(grammar, cache.utf8_guard) if grammar is not None else None
    return Sequence("r", [1, 2], params, 8, 0, grammar=matcher)


@pytest.mark.parametrize("device", DEVICES)
def test_only_constrained_rows_are_masked(tokenizer, device):
    vocab = len(tokenizer) + PAD
    cache = GrammarCache(tokenizer, vocab, [tokenizer.eos_token_id])
    seqs = [
        seq(cache),
        seq(cache, choice=["yes", "no"]),
        seq(cache),
        seq(cache, regex="[0-9]+"),
        seq(cache, choice=["x"]),
    ]
    seqs[4].status = SequenceStatus.FINISHED  # ended meanwhile: its row is discarded
    logits = torch.randn(len(seqs), vocab, device=device)
    masked = grammar_mask.apply_masks(logits, seqs, vocab)
    assert masked.device == logits.device
    for row in (0, 2, 4):
        assert torch.equal(masked[row], logits[row])
    allowed = {1: ["y", "n"], 3: list("0123456789")}  # first characters a grammar allows
    for row, starts in allowed.items():
        ok = (masked[row] > float("-inf")).nonzero().flatten().tolist()
        assert ok and all(t < len(tokenizer) for t in ok)
        texts = tokenizer.convert_ids_to_tokens(ok)
        assert all(text[0] in starts for text in texts), texts
        assert torch.equal(masked[row, ok], logits[row, ok])
    # every row constrained: the same masks
    both = grammar_mask.apply_masks(logits[[1, 3]], [seqs[1], seqs[3]], vocab)
    assert torch.equal(both, masked[[1, 3]])


def test_special_tokens_are_not_the_text_they_spell(tokenizer):
    """xgrammar read a special token as its literal text: a choice of "<s>" let the
    model write the single BOS token, which the answer's text then drops (a user
    trial got "" for a choice of "<|endoftext|>"; and a choice of the stop token's
    own text, "<|im_end|>", ended at once with none of it). Special tokens are never
    the text a grammar asks for; the stop token still ends a complete one."""
    vocab = len(tokenizer)
    cache = GrammarCache(tokenizer, vocab, [tokenizer.eos_token_id])
    specials = list(tokenizer.all_special_ids)
    assert tokenizer.eos_token_id in specials
    assert specials, tokenizer.all_special_ids
    texts = [tokenizer.convert_ids_to_tokens(t) for t in specials]
    s = seq(cache, choice=texts)
    masked = grammar_mask.apply_masks(torch.zeros(1, vocab), [s], vocab)
    allowed = (masked[0] > float("-inf")).nonzero().flatten().tolist()
    assert allowed and not set(allowed) & set(specials), (texts, allowed)
    done = seq(cache, choice=["a"])
    grammar_mask.accept(done, tokenizer.convert_tokens_to_ids("a"))
    masked = grammar_mask.apply_masks(torch.zeros(1, vocab), [done], vocab)
    assert (masked[0] > float("-inf")).nonzero().flatten().tolist() == [tokenizer.eos_token_id]


# --- UTF-8: xgrammar 0.2.x accepts the bytes of a surrogate (ED A0..BF xx) in JSON
# strings, ``.`` and negated classes, and overlong forms (E0 80..9F xx, F0 80..8F xx xx)
# in a JSON schema's pattern; the engine's masks must not (engine/utf8_guard.py).

ED, A0, X80 = 0xED, 0xA0, 0x80
SURROGATE_FIRST = [ED, A0, X80]  # the model's wish: ED A0 80, i.e. U+D800


def token_bytes(tokenizer) -> list[bytes]:
    import xgrammar

    return xgrammar.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab


def drive(
    tokenizer,
    options: dict,
    wishes: list[bytes | int],
    finish: list[bytes | int],
    wish_steps: int = 8,
):
    """Greedy decoding of one constrained row through apply_masks and accept, the
    logits ranking ``wishes`` first for ``wish_steps`` steps and then ``finish`` (single bytes
    as ints, whole tokens as bytes), until the grammar ends (or 40 steps).
    Returns the output's bytes and whether the grammar ended."""
    vocab = token_bytes(tokenizer)
    ids = {text: i for i, text in enumerate(vocab) if text}
    cache = GrammarCache(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    s = seq(cache, **options)

    def logits(ranking: list[bytes | int]) -> torch.Tensor:
        out = torch.zeros(1, len(tokenizer))
        for rank, wish in enumerate(ranking):
            text = bytes([wish]) if isinstance(wish, int) else wish
            out[0, ids[text]] = 100.0 - rank
        return out

    out = []
    for step in range(40):
        masked = grammar_mask.apply_masks(
            logits(wishes if step < wish_steps else finish), [s], len(tokenizer)
        )
        token = int(masked.argmax())
        assert masked[0, token] > float("-inf"), f"no token allowed at step {step}"
        ended = grammar_mask.accept(s, token)
        if ended:
            return b"".join(vocab[t] for t in out), True
        out.append(token)
    return b"".join(vocab[t] for t in out), False


STRUCTURE = [b"{", b"<", b'"']  # lower wishes: how each grammar below must start
CASES = [
    ({"json_schema": {"type": "string"}}, [b"</s>", b'"'], json.loads),
    ({"json_schema": {"type": "string", "maxLength": 4}}, [b"</s>", b'"'], json.loads),
    ({"json_object": True}, [b"</s>", b'"', b":", b" ", b"}"], json.loads),
    ({"regex": '[^"]*"'}, [b"</s>", b'"'], lambda text: text[:-1]),
    ({"grammar": 'root ::= "<" [^>]* ">"'}, [b"</s>", b">"], lambda text: text[1:-1]),
]


@pytest.mark.parametrize(
    "options, finish, content",
    CASES,
    ids=["json-string", "json-maxLength", "json_object", "regex", "grammar"],
)
def test_constrained_output_has_no_utf8_surrogate(tokenizer, options, finish, content):
    """The model wants ED A0 80 (a surrogate, not UTF-8, three U+FFFD once decoded)
    inside a string the grammar accepts it in: the mask lets it write ED 80 A0
    (U+D020, valid) instead, and the answer decodes and keeps its bounds."""
    raw, ended = drive(tokenizer, options, SURROGATE_FIRST + STRUCTURE, finish)
    assert ended, raw
    assert b"\xed" in raw, raw  # the model got as close as UTF-8 allows
    text = raw.decode("utf-8")  # strict: a surrogate's bytes raise
    value = content(text)
    assert "\ufffd" not in text and any(0xD000 <= ord(c) < 0xD800 for c in str(value)), text
    if "maxLength" in options.get("json_schema", {}):
        assert len(value) <= 4, value


@pytest.mark.parametrize("bounds", [{"maxLength": 6}, {"minLength": 1, "maxLength": 3000}])
def test_a_length_bounded_string_admits_no_control_character(tokenizer, bounds):
    """xgrammar's own class for a length-bounded string's characters lets every
    control character but CR and LF through, which JSON forbids raw in a string:
    the model's wish for a tab or \\x01 is refused, and the answer is strict JSON."""
    options = {"json_schema": {"type": "string", **bounds}}
    wishes = [0x09, 0x01, 0x1F, *STRUCTURE, b"a"]
    raw, ended = drive(tokenizer, options, wishes, [b"</s>", b'"'], wish_steps=5)
    assert ended, raw
    value = json.loads(raw.decode("utf-8"))  # strict: a raw control character raises
    assert value and not any(ord(c) < 0x20 for c in value), raw
    assert len(value) <= bounds["maxLength"]


def test_a_grammar_that_demands_a_surrogate_is_not_stuck(tokenizer):
    """A grammar whose only sentence after "a" is a surrogate: masking it would
    leave no token, so that row keeps its grammar's mask (and ends)."""
    raw, ended = drive(tokenizer, {"grammar": r'root ::= "a" [\ud800-\udfff]'}, [], [b"</s>"])
    assert ended and raw[:2] == b"a\xed" and len(raw) == 4, raw


OVERLONG_CASES = [
    {"json_schema": {"type": "string", "maxLength": 4}},  # compiled as a pattern
    {"json_schema": {"type": "string", "pattern": '^[^"]{1,6}$'}},
    {
        "json_schema": {
            "type": "object",
            "properties": {"ok": {"type": "string", "maxLength": 4}},
            "required": ["ok"],
        }
    },
]


@pytest.mark.parametrize("lead", [[0xE0, X80, X80], [0xF0, X80, X80, X80]], ids=["E0", "F0"])
@pytest.mark.parametrize("options", OVERLONG_CASES, ids=["maxLength", "pattern", "object"])
def test_constrained_output_has_no_overlong_utf8(tokenizer, options, lead):
    """The model wants an overlong form (E0 80 80 is U+0000 in three bytes; Python
    decodes it as three U+FFFD), which xgrammar's schema patterns accept: the mask
    lets the lead byte through only with a well-formed continuation, and the
    answer decodes strictly and keeps its bounds (the intermittent CI failure of
    test_structured_serving: ``"ok": "hun\ufffd\ufffd\ufffd"`` under maxLength 4)."""
    finish = [b"</s>", b'"', b"}"]
    raw, ended = drive(tokenizer, options, lead + STRUCTURE, finish, wish_steps=16)
    assert ended, raw
    assert bytes([lead[0]]) in raw, raw  # the model got as close as UTF-8 allows
    text = raw.decode("utf-8")  # strict: an overlong form raises
    value = json.loads(text)
    string = value if isinstance(value, str) else value.get("ok", "")
    assert "\ufffd" not in text and len(string) <= 6, text
    if "maxLength" in json.dumps(options):
        assert len(string) <= 4, string


def test_utf8_guard_tables():
    """The masks and the state tracking on a hand-made vocabulary."""
    from mii.engine.utf8_guard import COMPLETE, Utf8Guard

    vocab = [
        b"a",  # 0
        b"\xed",  # 1: lead of U+D000..U+DFFF
        b"\xa0",  # 2
        b"\x80",  # 3
        b"x\xed\xa0\x80",  # 4: holds a surrogate
        b"\xed\x9f\xbf",  # 5: U+D7FF
        b"",  # 6: no bytes (a special token)
        b"\xbf!",  # 7
        b"\xe0",  # 8: lead of U+0800..U+0FFF (else overlong)
        b"\xe0\x80\x80",  # 9: overlong U+0000
        b"\xf0\x8f\xbf\xbf",  # 10: overlong U+FFFF
        b"\xf4\x90\x80\x80",  # 11: past U+10FFFF
        b"\xc0\x80",  # 12: overlong two-byte form
        b"\xe2\x82",  # 13: the first two bytes of the euro sign
        b"\xac",  # 14: its last byte
        b"\xf0\x9f",  # 15: the start of an emoji
        b"\x98\x80",  # 16: its end
    ]
    guard = Utf8Guard(vocab, 40)  # 40: ids past the vocabulary have no bytes

    def allowed(state: int) -> list[int]:
        bitmask = np.full((1, 2), -1, dtype=np.int32)  # the grammar allows everything
        assert guard.restrict(bitmask, np.array([state])).size == 0
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits).tolist()

    def state_after(*tokens: int) -> int:
        state = COMPLETE
        for token in tokens:
            state = guard.after(token, state)
        return state

    everything = list(range(40))
    no_bytes = [6, *range(len(vocab), 40)]
    ill_formed = {4, 9, 10, 11, 12}
    continuations = {2, 3, 7, 14, 16}  # tokens that start with a continuation byte
    assert allowed(COMPLETE) == [t for t in everything if t not in ill_formed | continuations]
    after_ed = state_after(1)
    assert allowed(after_ed) == sorted([3, 16, *no_bytes])  # 80..9F, not A0..BF: no surrogate
    after_e0 = state_after(8)
    assert allowed(after_e0) == sorted([2, 14, *no_bytes])  # A0..BF (not overlong), then one
    assert allowed(state_after(13)) == sorted([2, 3, 7, 14, *no_bytes])  # any continuation
    assert allowed(state_after(15)) == sorted([2, 3, 14, 16, *no_bytes])  # two, 80..BF
    assert state_after(13, 14) == state_after(15, 16) == state_after(1, 3, 3) == COMPLETE
    assert state_after(1, 6) == after_ed and state_after(8, 39) == after_e0  # no bytes: no change
    assert state_after(1, 3) == state_after(13)  # one byte missing, any continuation
    empty = np.zeros((1, 2), dtype=np.int32)  # the grammar allows nothing: reported
    assert guard.restrict(empty, np.array([COMPLETE])).tolist() == [0]
    # rows in different states at once: each row as on its own
    states = [COMPLETE, after_ed, after_e0, COMPLETE]
    rows = np.full((len(states), 2), -1, dtype=np.int32)
    assert guard.restrict(rows, np.array(states)).size == 0
    for row, state in zip(rows, states):
        bits = np.unpackbits(row.view(np.uint8), bitorder="little")
        assert np.flatnonzero(bits).tolist() == allowed(state)


def test_utf8_guard_automaton_agrees_with_the_strict_decoder():
    """Every byte string of up to two bytes, and random longer ones: the guard's
    automaton ends complete exactly when Python's strict decoder accepts the bytes,
    and refuses exactly the strings no continuation can make well-formed."""
    import random

    from mii.engine.utf8_guard import _INVALID, COMPLETE, _transition

    def decodes(text: bytes) -> bool:
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def completable(text: bytes) -> bool:  # some 0-3 continuation bytes complete it
        # (the next byte's range may be narrowed by the lead: try each range's ends;
        # any continuation byte serves after that)
        first = [b"", *(bytes([b]) for b in (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF))]
        later = [b"", b"\x80"]
        return any(decodes(text + a + b + c) for a in first for b in later for c in later)

    rng = random.Random(0)
    pool = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF]
    pool += [0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
    texts = [bytes([a, b]) for a in range(256) for b in range(256)]
    texts += [bytes(rng.choice(pool) for _ in range(rng.randint(3, 7))) for _ in range(20000)]
    for text in texts:
        state = _transition(COMPLETE, text)
        assert (state == COMPLETE) == decodes(text), text
        if state == _INVALID and len(text) <= 2:
            assert not completable(text), text
        if state not in (_INVALID, COMPLETE):
            assert completable(text), text
