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


# --- UTF-8: xgrammar 0.2.x accepts the bytes of a surrogate (ED A0..BF xx) in JSON
# strings, ``.`` and negated classes; the engine's masks must not (engine/utf8_guard.py).

ED, A0, X80 = 0xED, 0xA0, 0x80
SURROGATE_FIRST = [ED, A0, X80]  # the model's wish: ED A0 80, i.e. U+D800


def token_bytes(tokenizer) -> list[bytes]:
    import xgrammar

    return xgrammar.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab


def drive(tokenizer, options: dict, wishes: list[bytes | int], finish: list[bytes | int]):
    """Greedy decoding of one constrained row through apply_masks and accept, the
    logits ranking ``wishes`` first for 8 steps and then ``finish`` (single bytes
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
            logits(wishes if step < 8 else finish), [s], len(tokenizer)
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


def test_a_grammar_that_demands_a_surrogate_is_not_stuck(tokenizer):
    """A grammar whose only sentence after "a" is a surrogate: masking it would
    leave no token, so that row keeps its grammar's mask (and ends)."""
    raw, ended = drive(tokenizer, {"grammar": r'root ::= "a" [\ud800-\udfff]'}, [], [b"</s>"])
    assert ended and raw[:2] == b"a\xed" and len(raw) == 4, raw


def test_utf8_guard_tables():
    """The masks and the lone-lead tracking on a hand-made vocabulary."""
    from mii.engine.utf8_guard import Utf8Guard

    vocab = [b"a", b"\xed", b"\xa0", b"\x80", b"x\xed\xa0\x80", b"\xed\x9f\xbf", b"", b"\xbf!"]
    guard = Utf8Guard(vocab, 40)  # 40: ids past the vocabulary have no bytes

    def allowed(lone_lead: bool) -> list[int]:
        bitmask = np.full((1, 2), -1, dtype=np.int32)  # the grammar allows everything
        assert guard.restrict(bitmask, np.array([lone_lead])).size == 0
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits).tolist()

    everything = list(range(40))
    assert allowed(False) == [t for t in everything if t != 4]
    assert allowed(True) == [t for t in everything if t not in (2, 4, 7)]
    assert guard.after(1, False) and guard.after(6, True) and not guard.after(6, False)
    assert not guard.after(3, True) and not guard.after(5, True) and guard.after(39, True)
    empty = np.zeros((1, 2), dtype=np.int32)  # the grammar allows nothing: reported
    assert guard.restrict(empty, np.array([False])).tolist() == [0]
