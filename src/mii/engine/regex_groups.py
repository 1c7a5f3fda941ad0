"""Regex constraints rewritten for xgrammar's regex parser: named groups as plain
groups, and ``.`` as Python reads it.

xgrammar (0.2.x) refuses Python's ``(?P<name>...)`` (what Python users, pydantic
and outlines write) and, in its own ``(?<name>...)`` form, any name with a digit or
an underscore ("Invalid named capturing group"). A constraint never refers to a
group by name (backreferences are refused before this), so the names can go: each
named group becomes the same plain group.

xgrammar's ``.`` also matches a line feed, which Python's (and ECMAScript's) does
not: ``x.{1,8}y`` answered "x winds,\\ny", which ``re.fullmatch`` refuses (a user
trial). A ``.`` outside a class becomes ``[^\\n]``.

xgrammar's regex reader takes ``\\x`` with as many hex digits as follow (``\\x41bc``
answered U+41BC where Python reads "Abc"; ``a\\x20b`` matched nothing) and reads
``\\101`` as a backreference where Python reads an octal escape ("A"): such escapes
become ``\\u00HH``, which both read as one character outside a class; a class
holding an escaped character is written anew (:func:`_class_as_xgrammar_reads_it`).
"""

from __future__ import annotations

import re

from mii.engine.regex_sets import sre_constants, sre_parse

# A named group's opening at a "(" outside a character class: "(?P<name>" or
# "(?<name>" (not the lookbehinds "(?<=" and "(?<!").
_NAMED_OPENING = re.compile(r"\(\?P?<(?![=!])[A-Za-z_][A-Za-z0-9_]*>")

# Python's escapes of one character by its code: \xHH; octal \0, \0o, \0oo and \ooo
# outside a class (\1 .. \99 otherwise are backreferences); in a class \o to \ooo.
_HEX_ESCAPE = re.compile(r"\\x([0-9A-Fa-f]{2})")
_OCTAL_ESCAPE = re.compile(r"\\(0[0-7]{0,2}|[0-7]{3})")
_OCTAL_ESCAPE_IN_CLASS = re.compile(r"\\([0-7]{1,3})")


def as_xgrammar_reads_it(pattern: str) -> str:
    """``pattern`` with each named group's opening replaced by ``(``, each ``.``
    outside a class by ``[^\\n]`` and each hex or octal escape by ``\\u00HH``, for
    xgrammar to match what ``re.fullmatch`` matches (``(?s)`` is refused by
    xgrammar itself)."""
    return without_group_names(pattern, python_reading=True)


def without_group_names(pattern: str, python_reading: bool = False) -> str:
    """``pattern`` with each named group's opening replaced by ``(`` (and, with
    ``python_reading``, each ``.`` outside a class by ``[^\\n]`` and each hex or
    octal escape by ``\\u00HH``); other escapes and character classes (where ``(?P<``
    is literal characters) are copied as they are."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":  # an escape and the character it escapes
            coded = _code_point_escape(pattern, i, in_class) if python_reading else None
            if coded:
                out.append(_by_code(coded[0]))
                i = coded[1]
                continue
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            rewritten = _class_as_xgrammar_reads_it(pattern, i) if python_reading else None
            if rewritten:
                out.append(rewritten[0])
                i = rewritten[1]
                continue
            in_class = True
            # "[]..." and "[^]...": a "]" right after the opening is a literal.
            start = i + 1 + (pattern[i + 1 : i + 2] == "^")
            if pattern[start : start + 1] == "]":
                out.append(pattern[i : start + 1])
                i = start + 1
                continue
        elif char == "(":
            opening = _NAMED_OPENING.match(pattern, i)
            if opening:
                out.append("(")
                i = opening.end()
                continue
        elif char == "." and python_reading:
            char = r"[^\n]"
        out.append(char)
        i += 1
    return "".join(out)


def _code_point_escape(pattern: str, i: int, in_class: bool) -> tuple[int, int] | None:
    """(code point, end) of the hex or octal escape at ``pattern[i]``, or None.
    (An octal value above 0o377 is left for Python's parse to refuse.)"""
    hex_escape = _HEX_ESCAPE.match(pattern, i)
    if hex_escape:
        return int(hex_escape[1], 16), hex_escape.end()
    octal = (_OCTAL_ESCAPE_IN_CLASS if in_class else _OCTAL_ESCAPE).match(pattern, i)
    if octal and int(octal[1], 8) <= 0o377:
        return int(octal[1], 8), octal.end()
    return None


# Escapes in a class that name a character by its code or escape it ("\\x04", "\\^"):
# their classes are written anew (categories such as \\d stay as they are).
_ESCAPED_CLASS_CHARACTER = re.compile(r"\\[^dDwWsS]")
_CATEGORY_ESCAPES = {
    sre_constants.CATEGORY_DIGIT: r"\d",
    sre_constants.CATEGORY_NOT_DIGIT: r"\D",
    sre_constants.CATEGORY_WORD: r"\w",
    sre_constants.CATEGORY_NOT_WORD: r"\W",
    sre_constants.CATEGORY_SPACE: r"\s",
    sre_constants.CATEGORY_NOT_SPACE: r"\S",
}


def _class_end(pattern: str, i: int) -> int:
    """The index after the class that opens at ``pattern[i]`` (len: unclosed)."""
    j = i + 1 + (pattern[i + 1 : i + 2] == "^")
    j += pattern[j : j + 1] == "]"  # a "]" right after the opening is a literal
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return min(j + 1, len(pattern))


def _class_as_xgrammar_reads_it(pattern: str, i: int) -> tuple[str, int] | None:
    """The class opening at ``pattern[i]`` written so that xgrammar (0.2.x) reads the
    characters Python reads, with its end; None to copy it as it is (no escaped
    character in it, or Python cannot parse it: its parse refuses it later).

    xgrammar prints a class into its grammar with ``\\xHH`` for a character below
    U+0100 that is not printable, and reads that back with every hex digit that
    follows (``[\\x04a]`` matched "J" alone), and reads a ``^`` it printed first as a
    negation (``[\\^]`` matched everything but "^"). So each character is written by
    its code, the ranges that end in such a character come last, and a class of
    ``^`` alone becomes ``\\^`` outside a class."""
    end = _class_end(pattern, i)
    text = pattern[i:end]
    if not _ESCAPED_CLASS_CHARACTER.search(text):
        return None
    try:
        [(op, value)] = sre_parse.parse(text)
    except (re.error, ValueError, OverflowError):
        return None
    c = sre_constants
    if op == c.LITERAL:  # (Python reads a class of one character as that character)
        return _outside_class(value), end
    items = [(c.LITERAL, value)] if op == c.NOT_LITERAL else value
    negated = op == c.NOT_LITERAL or any(inner_op == c.NEGATE for inner_op, _ in items)
    first, last = [], []  # (last: ranges that xgrammar prints ending in \\xHH)
    caret = False  # a "^" in a class that is not negated: written last, never first
    for inner_op, inner in items:
        if inner_op == c.CATEGORY:
            first.append(_CATEGORY_ESCAPES[inner])
        elif inner_op in (c.LITERAL, c.RANGE):
            low, high = (inner, inner) if inner_op == c.LITERAL else inner
            if low == ord("^") and not negated:
                caret = True
                low += 1
            if low < 0x7F <= high <= 0xFF:  # (split: "0-\\x7f" after "\\x1f" read "\\x1f0")
                first.append(_in_class_range(low, 0x7E))
                low = 0x7F
            if low <= high:
                text = _in_class_range(low, high)
                (last if high < 0x20 or 0x7F <= high <= 0xFF else first).append(text)
    if caret and not first and not last:
        return r"\^", end
    return "[" + "^" * negated + "".join(first + last) + r"\^" * caret + "]", end


def _in_class_range(low: int, high: int) -> str:
    return _in_class(low) + ("" if low == high else "-" + _in_class(high))


def _in_class(code: int) -> str:
    char = chr(code)
    if 0x20 <= code < 0x7F:
        return "\\" + char if char in "\\]-[^" else char
    return _by_code(code)


def _outside_class(code: int) -> str:
    return re.escape(chr(code)) if 0x20 <= code < 0x7F else _by_code(code)


def _by_code(code: int) -> str:
    """The escape of a character by its code that both Python and xgrammar read."""
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
