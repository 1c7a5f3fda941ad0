"""Patterns as Python's ``re`` reads them (a user trial's findings):

- a JSON-schema ``pattern`` that names characters JSON must escape (a quote, a
  backslash, control characters) gives JSON text with their escapes: xgrammar
  wrote them raw (``^a\\nb$`` answered an unparseable string, ``^C:\\\\temp$`` a
  tab);
- a regex constraint's ``.`` does not match a line feed;
- what xgrammar would match as something else (``\\A``, ``\\Z``, ``a^b``, ``\\b``,
  ``(?i)``) is refused naming the option.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string as accepts

import mii
from mii.engine.json_patterns import string_content_ebnf
from mii.engine.regex_groups import as_xgrammar_reads_it
from mii.errors import InvalidRequestError

# (pattern, strings to try): each string is accepted exactly when re.fullmatch takes it
PATTERNS = [
    (r"^a\nb$", ["a\nb", "a\\nb", "ab", "a\tb"]),
    (r'^"q"$', ['"q"', "q", '\\"q\\"']),
    (r"^C:\\temp$", ["C:\\temp", "C:\temp", "C:\\\\temp"]),
    (r"^\t[a-z]{1,3}$", ["\tab", "ab", "\tabcd", " ab"]),
    (r"^[\x00-\x1f]{2}$", ["\x01\x1f", "\n\t", "a\n", "\x7f\x00"]),
    (r"^[a-z\s]{1,12}$", ["ab c\nd", "AB", "a\u3000b", "\r\n"]),
    (r"^[\s\S]{2}$", ['a"', "\\\n", "😀é", "abc"]),
    (r"^(x|\n|\")+y.$", ['x\n"yz', "xy\n", 'xy"', "y."]),
    (r"^[^a-z]{1,3}\n$", ["É\n", '"\\\n', "a\n", "\n"]),
    (r"^\d{2}\s\w+\W$", ["12 ab_9!", "12\tx.", "1x ab!"]),
    (r"^(?s:.)\n$", ["\n\n", "x\n"]),
    (r"^(?:ab|\\){2,}?$", ["ab\\", "abab", "\\", "ab\\ab"]),
    # a quantifier after a group of one quantified item (was "\\n"+? to xgrammar)
    (r"^(?:\n+)?$", ["", "\n\n", "x"]),
    (r"^(\n{2}){3}$", ["\n" * 6, "\n" * 4]),
    (r"^([A-Za-z\s]{1,8})?$", ["", "ab c", "a1"]),
]


@pytest.mark.parametrize(("pattern", "strings"), PATTERNS)
def test_the_grammar_takes_the_json_text_of_exactly_the_matching_strings(pattern, strings):
    grammar = xgrammar.Grammar.from_ebnf(f'root ::= "\\"" {string_content_ebnf(pattern)} "\\""')
    for string in strings:
        text = json.dumps(string, ensure_ascii=False)
        assert accepts(grammar, text) == bool(re.fullmatch(pattern, string)), (pattern, string)


# Where Python's re and ECMAScript (JSON Schema's dialect) differ, what both match.
# (pattern, a string only one reading matches, one both match)
BOTH_READINGS = [
    (r"^\w\n$", "é\n", "_\n"),  # a word character in Python only
    (r"^\D\n$", "\u0663\n", "é\n"),  # an Arabic-Indic digit: not \D in Python
    (r"^\s\n$", "\x1c\n", "\u3000\n"),  # a space in Python only
    (r"^\S\n$", "\ufeff\n", '"\n'),  # a space in ECMAScript only
    (r"^.\n$", "\r\n", "\t\n"),  # a line terminator in ECMAScript
    (r"^[^\d]\n$", "\u0663\n", "x\n"),  # negated: what either reading counts stays out
    (r"^[^\W]\n$", "é\n", "a\n"),
]


@pytest.mark.parametrize(("pattern", "one", "both"), BOTH_READINGS)
def test_categories_keep_to_what_both_readings_match(pattern, one, both):
    grammar = xgrammar.Grammar.from_ebnf(f'root ::= "\\"" {string_content_ebnf(pattern)} "\\""')
    assert not accepts(grammar, json.dumps(one, ensure_ascii=False))
    assert accepts(grammar, json.dumps(both, ensure_ascii=False))


def test_a_regex_dot_does_not_match_a_line_feed():
    grammar = xgrammar.Grammar.from_regex(as_xgrammar_reads_it(r"x.{1,8}y"))
    assert accepts(grammar, "x winds, y")
    assert not accepts(grammar, "x winds,\ny")
    classes = xgrammar.Grammar.from_regex(as_xgrammar_reads_it(r"[.]\.x"))  # literal dots stay
    assert accepts(classes, "..x") and not accepts(classes, "a.x")


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def engine(checkpoints):
    engine = mii.AsyncEngine(str(checkpoints("llama")[0]), max_num_seqs=64)
    yield engine
    run(engine.aclose())


def schema_of(pattern: str) -> dict:
    return {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": pattern, "title": "S"}},
        "required": ["s"],
        "additionalProperties": False,
    }


async def answers(engine, schema: dict, seeds: range) -> list[mii.Response]:
    calls = [
        engine.generate(["Say it"], json_schema=schema, max_new_tokens=80, seed=s, temperature=1.5)
        for s in seeds
    ]
    return [answer for [answer] in await asyncio.gather(*calls)]


@pytest.mark.parametrize("pattern", [p for p, _ in PATTERNS])
def test_sampled_answers_parse_and_validate(engine, pattern):
    schema = schema_of(pattern)
    for answer in run(answers(engine, schema, range(6))):
        assert answer.finish_reason == "stop", answer.generated_text
        value = json.loads(answer.generated_text)
        jsonschema.validate(value, schema)
        assert re.fullmatch(pattern, value["s"])


def test_a_pattern_deep_in_a_schema_and_under_defs(engine):
    schema = {
        "type": "object",
        "properties": {
            "rows": {
                "type": "array",
                "items": {"$ref": "#/$defs/line"},
                "minItems": 2,
                "maxItems": 2,
            },
            "plain": {"type": "string", "pattern": "^[a-z]{2}$"},
        },
        "required": ["rows", "plain"],
        "additionalProperties": False,
        "$defs": {"line": {"type": "string", "pattern": '^"[0-9]"\\t$'}},
    }
    for answer in run(answers(engine, schema, range(3))):
        value = json.loads(answer.generated_text)
        jsonschema.validate(value, schema)
        assert all(re.fullmatch(r'"[0-9]"\t', row) for row in value["rows"])


def test_where_the_pattern_sits_in_a_schema():
    """Compiled wherever a string schema with such a pattern is: a property named like
    a keyword, beside $schema, nullable; an unused definition is no error (xgrammar
    writes no rule for it)."""
    from mii.engine.constraints import _as_xgrammar_reads_it, _json_schema_grammar
    from mii.engine.json_patterns import with_placeholders

    def grammar(schema):
        readable, patterns = with_placeholders(_as_xgrammar_reads_it(schema))
        return _json_schema_grammar(json.dumps(readable), patterns)

    named_default = {
        "type": "object",
        "properties": {"default": {"type": "string", "pattern": "^a\\nb$"}},
        "required": ["default"],
    }
    assert accepts(grammar(named_default), '{"default": "a\\nb"}')
    assert not accepts(grammar(named_default), '{"default": "a\nb"}')
    rooted = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema_of('^"$')}
    assert accepts(grammar(rooted), '{"s": "\\""}')
    nullable = {"type": ["string", "null"], "pattern": "^\\t$"}
    assert accepts(grammar(nullable), '"\\t"') and accepts(grammar(nullable), "null")
    assert not accepts(grammar(nullable), '"\t"')
    unused = {"$defs": {"unused": {"type": "string", "pattern": "^a\\nb$"}}, **schema_of("^x$")}
    assert accepts(grammar(unused), '{"s": "x"}')


REFUSED = [
    ({"regex": r"[0-9]{2}\Z"}, "regex", r"\A and \Z are not supported"),
    ({"regex": r"\Aabc"}, "regex", r"\A and \Z are not supported"),
    ({"regex": "a^b"}, "regex", "anchor (^ or $) inside the pattern"),
    ({"regex": "(ab$)c"}, "regex", "anchor (^ or $) inside the pattern"),
    ({"regex": r"\bword"}, "regex", "word boundaries"),
    ({"regex": "(?i)abc"}, "regex", "case-insensitive"),
    (
        {"json_schema": schema_of("^a^b$")},
        "json_schema",
        "the pattern at #/properties/s: an anchor",
    ),
    ({"json_schema": schema_of(r"^a\nb\Z")}, "json_schema", r"\A and \Z"),
    ({"json_schema": schema_of(r"^[^\s\S]\n$")}, "json_schema", "matches no character"),
    ({"json_schema": schema_of(r"^\n*+\n$")}, "json_schema", "possessive"),
    # a count past what Python's parser takes: a 400, not an OverflowError (a 500)
    ({"regex": "a{4294967295}"}, "regex", ""),
    ({"json_schema": schema_of("^a{4294967295}$")}, "json_schema", ""),
    # counts xgrammar wrapped at 2**32 ("{4294967297}" matched once): a re-trial
    ({"regex": "a{4294967297}"}, "regex", "the repetition number is too large"),
    ({"regex": "a{200000}"}, "regex", "repetition counts above"),
    ({"json_schema": schema_of('^"{200000}$')}, "json_schema", "repetition counts above"),
    # what Python cannot read went to xgrammar, which wrote the quote raw ('""""')
    ({"json_schema": schema_of('^[\\e"]{2}$')}, "json_schema", "not a valid regular expression"),
    ({"regex": "abc\\z"}, "regex", "bad escape"),
    (  # a property name JSON must escape: xgrammar wrote it raw
        {
            "json_schema": {
                "type": "object",
                "patternProperties": {'^"k[0-9]$': {"type": "integer"}},
                "additionalProperties": False,
            }
        },
        "json_schema",
        "property-name pattern",
    ),
]


@pytest.mark.parametrize(("options", "field", "words"), REFUSED)
def test_what_xgrammar_would_read_otherwise_is_refused(engine, options, field, words):
    with pytest.raises(InvalidRequestError) as caught:
        run(engine.generate(["x"], max_new_tokens=4, **options))
    assert caught.value.field == field
    assert words in str(caught.value)


def test_anchors_at_the_edges_of_alternatives_stay_accepted(engine):
    [answer] = run(engine.generate(["x"], regex=r"^ab$|^cd$", max_new_tokens=4, seed=3))
    assert answer.generated_text in ("ab", "cd")


# (pattern, strings to try): escapes by code, which xgrammar's regex reader took
# otherwise ("\x41bc" as one long hex escape, "a\x20b" as matching nothing, "\101"
# as a backreference); each string accepted exactly when re.fullmatch takes it.
CODED_ESCAPES = [
    (r"\x41bc", ["Abc", "\u41bc"]),
    (r"a\x20b", ["a b", "a\u020b"]),
    (r"[\x41b]c", ["Ac", "bc", "\u41bc"]),
    (r"\101\x42", ["AB", "\u0101B"]),
    (r"\0z|\012", ["\0z", "\n", "\0012"]),
    (r"[\101-\103]", ["B", "D"]),
    (r"[\1]\x7e", ["\1~", "1~"]),
    (r"a\\1", ["a\\1", "aa"]),  # a backslash and a "1", not a backreference
    # In a class xgrammar printed "\x04" and read it back with the "a" after it
    # ([\x04a] matched "J"), and read a "^" it printed first as a negation (a review)
    (r"[\x04a]", ["a", "\x04", "J"]),
    (r"[\136a]", ["a", "^", "b"]),
    (r"[\^]", ["^", "b"]),
    (r"[\x1f0-\x7f]", ["\x1f", "5", "\x7f", "\u01f0"]),
    (r"[\x00-\x1fa-z]+", ["ab\x01", "A", "~"]),
    (r"[^\xe9a]", ["\xe9", "a", "\u0e9a"]),
    (r"[\^-a\x7f^]", ["^", "_", "\x7f", "b"]),
]


@pytest.mark.parametrize(("pattern", "strings"), CODED_ESCAPES)
def test_escapes_by_code_match_what_python_matches(pattern, strings):
    grammar = xgrammar.Grammar.from_regex(as_xgrammar_reads_it(pattern))
    for string in strings:
        assert accepts(grammar, string) == bool(re.fullmatch(pattern, string)), (pattern, string)


def test_a_regex_with_escapes_by_code_answers_what_it_names(engine):
    [answer] = run(engine.generate(["x"], regex=r"\x41bc\101", max_new_tokens=8, seed=1))
    assert answer.generated_text == "AbcA"
    [answer] = run(engine.generate(["x"], regex=r"a\\1", max_new_tokens=8, seed=1))
    assert answer.generated_text == "a\\1"  # an escaped backslash: no backreference
    with pytest.raises(InvalidRequestError) as caught:  # Python refuses it: no guess
        run(engine.generate(["x"], regex=r"\x{41}", max_new_tokens=4))
    assert caught.value.field == "regex"
