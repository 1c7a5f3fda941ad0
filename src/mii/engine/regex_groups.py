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
"""

from __future__ import annotations

import re

# A named group's opening at a "(" outside a character class: "(?P<name>" or
# "(?<name>" (not the lookbehinds "(?<=" and "(?<!").
_NAMED_OPENING = re.compile(r"\(\?P?<(?![=!])[A-Za-z_][A-Za-z0-9_]*>")


def as_xgrammar_reads_it(pattern: str) -> str:
    """``pattern`` with each named group's opening replaced by ``(`` and each ``.``
    outside a class by ``[^\\n]``, for xgrammar to match what ``re.fullmatch``
    matches (``(?s)`` is refused by xgrammar itself)."""
    return without_group_names(pattern, python_dot=True)


def without_group_names(pattern: str, python_dot: bool = False) -> str:
    """``pattern`` with each named group's opening replaced by ``(`` (and, with
    ``python_dot``, each ``.`` outside a class by ``[^\\n]``); escapes and
    character classes (where ``(?P<`` is literal characters) are copied as they are."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":  # an escape and the character it escapes
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
        elif char == "." and python_dot:
            char = r"[^\n]"
        out.append(char)
        i += 1
    return "".join(out)
