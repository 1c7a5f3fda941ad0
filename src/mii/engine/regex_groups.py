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
become ``\\u00HH``, which both read as one character.
"""

from __future__ import annotations

import re

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
                out.append(f"\\u{coded[0]:04x}")
                i = coded[1]
                continue
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
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
