"""JSON-schema string patterns that match characters JSON must escape.

A ``pattern`` constrains a string's *value*; the answer is its JSON text, where a
quote, a backslash and every control character are written as escapes (``\\"``,
``\\\\``, ``\\n``, ``\\u0001``). xgrammar (0.2.x) wrote such characters of a pattern
raw: ``^a\\nb$`` answered ``"a<line feed>b"``, which no JSON parser reads, and
``^C:\\\\temp$`` parsed as a tab (a user trial). Where its regex reading is taken
instead, it cannot produce them at all.

Such a pattern is compiled here: parsed as Python parses it (:mod:`regex_sets`),
then written as an EBNF expression over the JSON text of the string's content,
each special character as its escape. The schema goes to xgrammar with a unique
placeholder string in the pattern's place, and its grammar gets the expression
back where the placeholder's literal is. Patterns without such characters stay
xgrammar's.
"""

from __future__ import annotations

import secrets
from typing import Any

from mii.engine import regex_sets
from mii.engine.regex_groups import without_group_names
from mii.engine.regex_sets import Ranges, is_repeat, sre_constants
from mii.engine.schema_walk import rebuilt

# Characters JSON must escape inside a string.
JSON_SPECIAL: Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
_SHORT_ESCAPES = {
    0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"
}  # fmt: skip
# Keys a pattern's schema may carry besides type and pattern (annotations): with
# any other keyword the schema stays xgrammar's whole.
_ANNOTATIONS = frozenset(
    ("title", "description", "$comment", "examples", "default", "deprecated", "readOnly",
     "writeOnly", "$schema", "$id")
)  # fmt: skip
_STRING_TYPES = ("string", ["string"], ["string", "null"], ["null", "string"])


def json_escape(code: int) -> str:
    """The JSON text of one character inside a string."""
    return _SHORT_ESCAPES.get(code) or f"\\u{code:04x}"


def with_placeholders(schema: Any) -> tuple[Any, dict[str, str]]:
    """``schema`` with each string schema whose pattern matches characters JSON
    must escape replaced by a ``const`` placeholder, and the EBNF expression of
    each placeholder's JSON string (quotes included). ValueError naming the
    pattern when it cannot be compiled here."""
    nonce = secrets.token_hex(8)
    expressions: dict[str, str] = {}

    def replaced(node: dict, path: str) -> Any:
        names = (
            [*(node.get("patternProperties") or {})]
            if isinstance(node.get("patternProperties"), dict)
            else []
        )
        named = node.get("propertyNames")
        if isinstance(named, dict) and isinstance(named.get("pattern"), str):
            names.append(named["pattern"])
        if any(_names_a_special_text(name) for name in names):
            raise ValueError(
                f"a property-name pattern at {path} names a character JSON must escape (a "
                "quote, a backslash, a control character): not supported in names"
            )
        if not _escaping_pattern(node):
            return node
        placeholder = f"mii-pattern-{nonce}-{len(expressions)}"
        try:
            body = string_content_ebnf(node["pattern"])
        except ValueError as err:
            raise ValueError(f"the pattern at {path}: {err}") from None
        string = f'"\\"" {body} "\\""'
        nullable = isinstance(node["type"], list) and "null" in node["type"]
        expressions[placeholder] = f'({string} | "null")' if nullable else f"({string})"
        return {"const": placeholder}

    return rebuilt(schema, replaced), expressions


def spliced(ebnf: str, expressions: dict[str, str]) -> str:
    """xgrammar's EBNF of a schema with placeholders, each placeholder's literal
    (a JSON string, as xgrammar writes a ``const``) replaced by its expression."""
    for placeholder, expression in expressions.items():
        # (absent where xgrammar wrote no rule: a definition nothing refers to)
        ebnf = ebnf.replace(f'"\\"{placeholder}\\""', expression)
    return ebnf


def _escaping_pattern(node: dict) -> bool:
    """Whether ``node`` is a string schema (type and pattern, annotations) whose
    pattern names a character JSON must escape: a literal, a class or ``\\s``.
    (``.`` and negated classes alone stay xgrammar's: it leaves the characters out.)"""
    pattern = node.get("pattern")
    if node.get("type") not in _STRING_TYPES or not isinstance(pattern, str):
        return False
    if set(node) - {"type", "pattern"} - _ANNOTATIONS:
        return False
    try:
        parsed = regex_sets.parse(without_group_names(pattern))
        return _names_a_special(parsed)
    except ValueError:
        return False  # (xgrammar's own error, as before)


def _names_a_special_text(pattern: str) -> bool:
    try:
        return _names_a_special(regex_sets.parse(without_group_names(pattern)))
    except ValueError:
        return False


def _names_a_special(items: Any) -> bool:
    c = sre_constants
    for op, value in items:
        if op in (c.LITERAL, c.IN):
            negated = op == c.IN and any(inner_op == c.NEGATE for inner_op, _ in value)
            ranges = regex_sets.item_set(op, value)
            if not negated and ranges and regex_sets.intersection(ranges, JSON_SPECIAL):
                return True
        else:
            inner = _inner_sequences(op, value)
            if any(_names_a_special(sequence) for sequence in inner):
                return True
    return False


def _inner_sequences(op: Any, value: Any) -> list:
    """The sequences of items inside a branch, a group or a repetition."""
    c = sre_constants
    if op == c.BRANCH:
        return list(value[1])
    if op == c.SUBPATTERN:
        return [value[3]]
    return [value[2]] if is_repeat(op) else []


def string_content_ebnf(pattern: str) -> str:
    """An EBNF expression matching the JSON text (without its quotes) of exactly
    the strings that ``re.fullmatch(pattern, s)`` accepts (each character in one
    spelling: special characters as their escapes, others as themselves).
    ValueError for what cannot be compiled: anchors inside the pattern, lookaround,
    backreferences, case-insensitive matching."""
    pattern = without_group_names(pattern)  # (ECMAScript's (?<name>...) too)
    parsed = regex_sets.parse(pattern)
    regex_sets.check_reads_the_same(pattern)  # (anchors at the edges only, no (?i), ...)
    return _sequence(parsed, dot_all=bool(regex_sets.flags_of(parsed) & regex_sets.re.DOTALL))


def _sequence(items: Any, dot_all: bool) -> str:
    """A parenthesised EBNF expression of a sequence of parsed items (always in
    parentheses: a quantifier after it applies to the whole, never to its last part)."""
    parts = [_item(op, value, dot_all) for op, value in items]
    return "(" + (" ".join(part for part in parts if part) or '""') + ")"


def _item(op: Any, value: Any, dot_all: bool) -> str:
    c = sre_constants
    ranges = regex_sets.item_set(op, value, dot_all)
    if ranges is not None:
        return _character(ranges)
    if op == c.AT:
        return ""  # (only ^ at the start and $ at the end are left: check_reads_the_same)
    if op == c.BRANCH:
        return "(" + " | ".join(_sequence(branch, dot_all) for branch in value[1]) + ")"
    if op == c.SUBPATTERN:  # (?s:...) turns dot-all on inside it, (?-s:...) off
        dot_all = bool(
            (dot_all or value[1] & regex_sets.re.DOTALL) and not value[2] & regex_sets.re.DOTALL
        )
        return _sequence(value[3], dot_all)
    if op == getattr(sre_constants, "POSSESSIVE_REPEAT", None):
        raise ValueError("possessive quantifiers are not supported")
    if is_repeat(op):
        low, high, inner = value
        body = _sequence(inner, dot_all)
        if high == sre_constants.MAXREPEAT:
            return f"{body}*" if low == 0 else f"{body}+" if low == 1 else f"{body}{{{low},}}"
        return f"{body}?" if (low, high) == (0, 1) else f"{body}{{{low},{high}}}"
    raise ValueError(f"{str(op).lower()} is not supported in a pattern")


def _character(ranges: Ranges) -> str:
    """One character of ``ranges``, as its JSON text: the plain ones in a class,
    each special one as its escape."""
    plain = regex_sets.minus(ranges, JSON_SPECIAL + regex_sets.SURROGATES)
    if len(plain) == 1 and plain[0][0] == plain[0][1]:  # one character
        options = [_literal(chr(plain[0][0]))]
    else:
        options = [_class(plain)] if plain else []
    for low, high in regex_sets.intersection(ranges, JSON_SPECIAL):
        options += [_literal(json_escape(code)) for code in range(low, high + 1)]
    if not options:
        raise ValueError("a character class there matches no character")
    return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"


def _class(ranges: Ranges) -> str:
    """An EBNF class of ``ranges`` (none of them special): negated when shorter."""
    if ranges[-1][1] == regex_sets.MAX_CODE_POINT:
        excluded = regex_sets.complement(ranges)  # the specials and surrogates among them
        return "[^" + "".join(_class_range(r) for r in excluded) + "]"
    return "[" + "".join(_class_range(r) for r in ranges) + "]"


def _class_range(bounds: tuple[int, int]) -> str:
    low, high = bounds
    return _class_char(low) if low == high else f"{_class_char(low)}-{_class_char(high)}"


def _class_char(code: int) -> str:
    if code < 0x20 or 0x7F <= code < 0xA0 or 0xD800 <= code <= 0xDFFF:
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    char = chr(code)
    return "\\" + char if char in "\\]-^[" else char


def _literal(text: str) -> str:
    """An EBNF string literal of ``text`` (JSON text: no control characters)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
