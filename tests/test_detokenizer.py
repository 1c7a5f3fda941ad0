"""Incremental detokenization and stop strings."""

from __future__ import annotations

import random

import pytest

import chat_tokenizers
from mii.config import GenerateParams
from mii.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from mii.engine.output_processor import OutputProcessor
from mii.engine.sequence import Sequence

TEXTS = [
    "DeepSpeed is a deep learning optimization library.",
    "café 東京 😀",
    "emoji 😀🚀✨👍 done",
    "Unicode: naïve résumé Zürich Ελληνικά русский 日本語 한국어",
    "  leading spaces,  double  spaces . and punctuation ; ( ) [ ] ! ?",
    "it 's a test , isn't it ? don 't",
    "Numbers: 0 1 2 3 10 100 1000\nnew line\n\ttab",
    "😀",
    "東",
]

PROMPTS = ["DeepSpeed is", "Unicode: café 東京", "😀🚀", "x"]


def stream(tokenizer, prompt_ids: list[int], generated: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.add(t, final=(i == len(generated) - 1)) for i, t in enumerate(generated)]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_pieces_concatenate_to_the_full_decode(tokenizer, text, prompt):
    prompt_ids = tokenizer(prompt).input_ids
    generated = tokenizer(text, add_special_tokens=False).input_ids
    expected = tokenizer.decode(generated, skip_special_tokens=True)
    assert expected == text  # the tokenizer round-trips these texts
    pieces = stream(tokenizer, prompt_ids, generated)
    assert "".join(pieces) == expected
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_every_char_boundary_split_of_a_tokenized_text(tokenizer, text):
    # Split the tokens of one text into prompt and generation at every place where
    # both halves decode to whole characters.
    ids = tokenizer(text).input_ids  # with BOS
    splits = 0
    for k in range(1, len(ids)):
        head = tokenizer.decode(ids[:k], skip_special_tokens=True)
        tail = tokenizer.decode(ids[k:], skip_special_tokens=True)
        if "\ufffd" in head + tail:
            continue
        splits += 1
        pieces = stream(tokenizer, ids[:k], ids[k:])
        assert "".join(pieces) == tail
        assert not any("\ufffd" in piece for piece in pieces)
    assert splits >= 1


def test_multibyte_characters_are_held_back_until_complete(tokenizer):
    text = "😀🚀✨"
    generated = tokenizer(text, add_special_tokens=False).input_ids
    assert len(generated) > 3  # byte-level BPE splits these characters
    detok = IncrementalDetokenizer(tokenizer, tokenizer("x").input_ids)
    pieces = [detok.add(t) for t in generated]
    assert all(piece in ("", "😀", "🚀", "✨") for piece in pieces), pieces
    assert "".join(pieces) == text
    assert "" in pieces  # some tokens completed no character


def test_incomplete_character_is_released_by_flush(tokenizer):
    generated = tokenizer("a😀", add_special_tokens=False).input_ids
    cut = generated[:-1]  # generation ends inside the emoji
    detok = IncrementalDetokenizer(tokenizer, tokenizer("x").input_ids)
    pieces = [detok.add(t) for t in cut]
    assert "".join(pieces) == "a"
    tail = detok.flush()
    assert "".join(pieces) + tail == tokenizer.decode(cut, skip_special_tokens=True)
    assert tail.endswith("\ufffd")


def test_special_tokens_are_skipped(tokenizer):
    a = tokenizer("hello", add_special_tokens=False).input_ids
    b = tokenizer(" world", add_special_tokens=False).input_ids
    generated = [*a, tokenizer.bos_token_id, tokenizer.pad_token_id, *b]
    pieces = stream(tokenizer, tokenizer("x").input_ids, generated)
    assert "".join(pieces) == "hello world"


def test_no_text_from_the_prompt_leaks_into_the_output(tokenizer):
    prompt_ids = tokenizer("a long prompt with many tokens in it").input_ids
    generated = tokenizer(" and more", add_special_tokens=False).input_ids
    pieces = stream(tokenizer, prompt_ids, generated)
    assert "".join(pieces) == " and more"


def test_decode_window_stays_short(tokenizer):
    class Recording:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, **kw):
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, **kw)

    text = " ".join(["the quick brown fox jumps over the lazy dog 😀 東京"] * 20)
    generated = tokenizer(text, add_special_tokens=False).input_ids
    assert len(generated) > 300
    recorder = Recording()
    detok = IncrementalDetokenizer(recorder, tokenizer("x").input_ids)
    pieces = [detok.add(t) for t in generated]
    assert "".join(pieces) + detok.flush() == text
    assert recorder.longest <= 16, "the decode window grows with the generated text"


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """SentencePiece style (Llama, Mistral) with byte fallback: see chat_tokenizers."""
    return chat_tokenizers.metaspace_tokenizer()


@pytest.mark.parametrize(
    ("prompt", "continuation"),
    [
        ("Hello", " world and more"),
        ("DeepSpeed is", " a city 😀 東京"),
        ("crab:", " 🦀 Ω ok"),  # not in the training text: byte fallback
    ],
)
def test_leading_space_of_the_first_generated_token_is_kept(
    metaspace_tokenizer, prompt, continuation
):
    tok = metaspace_tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    full_ids = tok(prompt + continuation, add_special_tokens=False).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert tok.unk_token_id not in full_ids
    generated = full_ids[len(prompt_ids) :]
    # Decoded alone the continuation loses its leading space; in context it has it.
    assert not tok.decode(generated).startswith(" ")
    expected = tok.decode(full_ids)[len(tok.decode(prompt_ids)) :]
    assert expected == continuation
    pieces = stream(tok, prompt_ids, generated)
    assert "".join(pieces) == continuation
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize(
    "text", ["crab 🦀 and omega Ω, then café 東京 😀", "Ω🦀Ω tail", "DeepSpeed is a library"]
)
def test_metaspace_every_split_streams_the_text_after_the_prompt(metaspace_tokenizer, text):
    tok = metaspace_tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    checked = 0
    for k in range(1, len(ids)):
        head = tok.decode(ids[:k])
        if "\ufffd" in head or not text.startswith(head):
            continue
        checked += 1
        pieces = stream(tok, ids[:k], ids[k:])
        assert "".join(pieces) == text[len(head) :], k
        assert not any("\ufffd" in piece for piece in pieces)
    assert checked >= len(ids) // 2


def test_prompt_ending_in_byte_fallback_characters(metaspace_tokenizer):
    # The prompt context (its last few tokens) starts inside a byte-fallback
    # character, and generation continues the same run of byte tokens.
    tok = metaspace_tokenizer
    prompt_ids = tok("crab 🦀🦀", add_special_tokens=False).input_ids
    full_ids = tok("crab 🦀🦀🦀 ok", add_special_tokens=False).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    generated = full_ids[len(prompt_ids) :]
    assert tok.convert_ids_to_tokens(generated[:4]) == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    pieces = stream(tok, prompt_ids, generated)
    assert "".join(pieces) == "🦀 ok"
    assert not any("\ufffd" in piece for piece in pieces)


def _bytes(tok, data: bytes) -> list[int]:
    return tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in data])


def _processed(tok, prompt_ids: list[int], generated: list[int]) -> list[str]:
    """The pieces the engine's output processor streams for ``generated``."""
    output = OutputProcessor(tok, [tok.eos_token_id])
    params = GenerateParams(max_new_tokens=len(generated))
    seq = Sequence("r", list(prompt_ids), params, len(generated), seed=0)
    output.start(seq)
    pieces = []
    for i, token in enumerate(generated):
        piece = output.process_token(seq, token, len(prompt_ids) + i)
        pieces.append(piece.generated_text)
    assert piece.finish_reason == "length"
    return pieces


def _invalid_run_cases(tok):
    words = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    bos, unk = tok.bos_token_id, tok.unk_token_id
    crab = words("crab:")
    return [
        # A valid character, then an invalid byte: the decoder turns the whole run into U+FFFD.
        (crab, _bytes(tok, "é".encode() + b"\xff") + words(" ok")),
        (crab, _bytes(tok, "€".encode() + b"\x80")),  # ends on the invalid byte
        (crab, _bytes(tok, b"\xf0\x9f\x98")),  # ends inside a character
        # A special token inside a run: skipped, so the run goes on across it.
        (crab, [*_bytes(tok, b"\xe2"), bos, *_bytes(tok, b"\x82\xac"), *words(" ok")]),
        (crab, [*_bytes(tok, "€".encode()), unk, *_bytes(tok, b"\xff"), *words(" end")]),
        # The prompt ends inside a character that the answer's bytes would complete.
        (crab + _bytes(tok, b"\xe2\x82"), _bytes(tok, b"\xac") + words(" ok")),
        ([bos, *_bytes(tok, b"\xe2")], _bytes(tok, b"\x82\xac\xff")),
    ]


def test_byte_fallback_invalid_runs_decode_as_the_tokenizer_does(metaspace_tokenizer):
    tok = metaspace_tokenizer
    cases = _invalid_run_cases(tok)
    invalid = [tok.decode(g, skip_special_tokens=True) for _, g in cases]
    assert sum("\ufffd" in text for text in invalid) == len(cases) - 1
    for prompt_ids, generated in cases:
        expected = tok.decode(generated, skip_special_tokens=True)
        assert "".join(stream(tok, prompt_ids, generated)) == expected, generated
        assert "".join(_processed(tok, prompt_ids, generated)) == expected, generated


def test_byte_fallback_random_runs_decode_as_the_tokenizer_does(metaspace_tokenizer):
    # Random mixes of valid and invalid byte runs, words and special tokens. The
    # first generated text token has no leading "▁": decoded alone it would lose
    # its space, which in context it keeps (see the leading-space test above).
    tok = metaspace_tokenizer
    rng = random.Random(15)
    words = [tok(w, add_special_tokens=False).input_ids for w in ("ok", " the", " café", "is")]
    chars = [c.encode() for c in "é€😀東"]
    specials = [tok.bos_token_id, tok.unk_token_id]
    prompts = [tok("crab:").input_ids, [*tok("x").input_ids, *_bytes(tok, b"\xe2\x82")]]
    checked = 0
    while checked < 150:
        generated: list[int] = []
        for _ in range(rng.randint(1, 10)):
            kind = rng.random()
            if kind < 0.3:
                generated += _bytes(tok, rng.choice(chars))
            elif kind < 0.5:
                generated += _bytes(tok, bytes([rng.randint(0x80, 0xFF)]))
            elif kind < 0.6:
                generated.append(rng.choice(specials))
            else:
                generated += rng.choice(words)
        first = next((t for t in generated if t not in specials), None)
        if first is None or tok.convert_ids_to_tokens(first).startswith("▁"):
            continue
        checked += 1
        prompt_ids = rng.choice(prompts)
        expected = tok.decode(generated, skip_special_tokens=True)
        assert "".join(_processed(tok, prompt_ids, generated)) == expected, generated


# ----- stop strings --------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, deltas: list[str], check: bool = True):
    released = []
    for delta in deltas:
        piece, stopped = matcher.feed(delta, check=check)
        released.append(piece)
        if stopped:
            return released, True
    released.append(matcher.flush())
    return released, False


def test_no_stop_strings_releases_everything_at_once():
    m = StopStringMatcher(())
    assert m.feed("abc") == ("abc", False)
    assert m.feed("def") == ("def", False)
    assert m.flush() == ""


def test_stop_string_spanning_several_deltas():
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello S") == ("hello ", False)  # "S" may begin the stop string
    assert m.feed("T") == ("", False)
    assert m.feed("O") == ("", False)
    assert m.feed("P and more") == ("", True)
    assert m.text == "hello "


def test_text_before_the_stop_is_returned_exactly():
    m = StopStringMatcher(["\n\n"])
    released, stopped = feed_all(m, ["Line one.", "\n", "Line", " two.\n", "\nLine three"])
    assert stopped
    assert "".join(released) == "Line one.\nLine two."
    assert m.text == "Line one.\nLine two."


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        (["xx ab", "c yy END zz"], "xx abc yy "),  # END first
        (["xx ab", "c yy EN", "D zz"], "xx abc yy "),
        (["one two three"], "one "),  # "two" before "three"
        (["one thr", "ee two"], "one "),  # "three" completes first
        (["abcEND"], "abc"),
    ],
)
def test_multiple_stop_strings_earliest_wins(deltas, expected):
    m = StopStringMatcher(["END", "two", "three"])
    released, stopped = feed_all(m, deltas)
    assert stopped
    assert "".join(released) == expected


def test_earliest_stop_wins_within_one_delta():
    m = StopStringMatcher(["world", "hello"])
    piece, stopped = m.feed("say hello world")
    assert stopped
    assert piece == "say "


def test_partial_prefix_is_held_back_then_released_when_it_diverges():
    m = StopStringMatcher(["<|end|>"])
    assert m.feed("a <|e") == ("a ", False)
    assert m.feed("n") == ("", False)
    assert m.feed("x") == ("<|enx", False)  # diverged: everything held is released
    assert m.feed(" <") == (" ", False)
    assert m.feed("<|end") == ("<", False)  # "<<|end": the first "<" cannot start it
    piece, stopped = m.feed("|>tail")
    assert stopped and piece == ""
    assert m.text == "a <|enx <"


def test_held_back_text_is_released_by_flush():
    m = StopStringMatcher(["STOP", "HALT"])
    assert m.feed("done ST") == ("done ", False)
    assert m.flush() == "ST"
    assert m.flush() == ""


def test_pieces_always_concatenate_to_the_final_text():
    text = "the cat sat on the mat, then the dog sat on the cat. END of story"
    stops = ["sat on the c", "END"]
    for size in (1, 2, 3, 5, 7, 64):
        m = StopStringMatcher(stops)
        deltas = [text[i : i + size] for i in range(0, len(text), size)]
        released, stopped = feed_all(m, deltas)
        assert stopped
        assert "".join(released) == "the cat sat on the mat, then the dog "
        assert "".join(released) == m.text


def test_check_false_finds_nothing_but_holds_back_a_possible_start():
    m = StopStringMatcher(["STOP"])
    assert m.feed("a STOP b", check=False) == ("a STOP b", False)
    # "STO" may begin a stop string completed once checking starts: held back.
    assert m.feed("STO", check=False) == ("", False)
    assert m.flush() == "STO"


def test_stop_string_generated_wholly_before_check_is_not_a_stop():
    m = StopStringMatcher(["STOP"])
    assert m.feed("a ST", check=False) == ("a ", False)
    assert m.feed("OP b", check=False) == ("STOP b", False)
    assert m.feed(" c", check=True) == (" c", False)
    assert m.flush() == ""


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (["x ST"], ["OP y"], "x "),  # begins before min_new_tokens, completes after
        (["x S", "T"], ["O", "P y"], "x "),
        (["x STO"], ["P"], "x "),
        (["aab"], ["a"], "a"),  # stop "aba" overlapping a partial match
    ],
)
def test_stop_string_straddling_the_check_boundary_stops(before, after, expected):
    # As in vLLM: a stop string counts when it ends after min_new_tokens, wherever
    # it begins; the text is cut where it begins, and the pieces still add up.
    m = StopStringMatcher(["STOP", "aba"])
    released = [m.feed(delta, check=False)[0] for delta in before]
    for delta in after:
        piece, stopped = m.feed(delta, check=True)
        released.append(piece)
        if stopped:
            break
    assert stopped
    assert m.text == expected
    assert "".join(released) == expected


def test_stop_string_is_found_after_check_turns_on():
    # Before min_new_tokens nothing is checked; from then on a new occurrence stops.
    m = StopStringMatcher(["STOP"])
    assert m.feed("x STO", check=False) == ("x ", False)  # "STO" may begin one: held
    piece, stopped = m.feed(" and then STOP here", check=True)
    assert stopped
    assert piece == "STO and then "


def test_stop_string_seen_before_check_does_not_hide_a_later_one():
    # The text released with check=False already holds the stop string; a second
    # occurrence generated after check turns on must still end generation.
    m = StopStringMatcher(["ab"])
    assert m.feed("ab", check=False) == ("ab", False)
    piece, stopped = m.feed("xab", check=True)
    assert (piece, stopped) == ("x", True)
    assert m.text == "abx"
