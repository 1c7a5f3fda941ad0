"""Regular expressions read as Python's ``re`` reads them, for the constraints.

A regex constraint or a JSON-schema ``pattern`` is parsed here with Python's own
parser (what users check answers with: ``re.fullmatch``, the ``jsonschema``
library), so that syntax xgrammar would read otherwise is refused with a clear
error instead of being matched as something else: ``\\A`` and ``\\Z`` became the
letters "A" and "Z", ``a^b`` matched "ab" (a user trial).

Each single-character item of a parsed pattern (a literal, ``.``, a class, ``\\d``)
is described as the set of code points it matches: sorted, disjoint, inclusive
``(low, high)`` ranges.
"""

from __future__ import annotations

import functools
import re
from typing import Any

try:  # Python 3.11+
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

Ranges = list[tuple[int, int]]
MAX_REPEAT_COUNT = 100_000

MAX_CODE_POINT = 0x10FFFF
SURROGATES: Ranges = [(0xD800, 0xDFFF)]

# The categories where Python's ``re`` (what users check answers with) and
# ECMAScript (JSON Schema's dialect) differ: a generated character must match the
# pattern under both, so a category stands for what both readings match (``\d``
# and ``\w`` in ASCII, as ECMAScript's; ``\D`` no digit of any script, as
# Python's) and, inside a negated class, for what either does.
_DIGIT: Ranges = [(0x30, 0x39)]
_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE_IN_BOTH: Ranges = [
    (0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
    (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
]  # fmt: skip
# Python's str.isspace adds 0x1c-0x1f and 0x85, ECMAScript the byte-order mark.
_SPACE_IN_EITHER: Ranges = [*_SPACE_IN_BOTH, (0x1C, 0x1F), (0x85, 0x85), (0xFEFF, 0xFEFF)]
_LINE_TERMINATORS: Ranges = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]


@functools.lru_cache(maxsize=2)
def _unicode_set(kind: str) -> Ranges:
    r"""Python's ``\d`` (Unicode category Nd) or ``\w`` (letters and digits of any
    script, and ``_``) over every code point (a tenth of a second, once)."""
    test = str.isdecimal if kind == "digit" else (lambda char: char.isalnum() or char == "_")
    return normalized([(code, code) for code in range(MAX_CODE_POINT + 1) if test(chr(code))])


def normalized(ranges: Ranges) -> Ranges:
    """``ranges`` sorted, with overlapping and adjacent ranges merged."""
    out: Ranges = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def complement(ranges: Ranges) -> Ranges:
    """Every code point not in ``ranges``."""
    out: Ranges = []
    start = 0
    for low, high in normalized(ranges):
        if low > start:
            out.append((start, low - 1))
        start = high + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return out


def minus(ranges: Ranges, removed: Ranges) -> Ranges:
    """The code points of ``ranges`` that are not in ``removed``."""
    return intersection(ranges, complement(removed))


def intersection(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    for low, high in normalized(a):
        for other_low, other_high in normalized(b):
            if other_low <= high and low <= other_high:
                out.append((max(low, other_low), min(high, other_high)))
    return normalized(out)


def contains(ranges: Ranges, code: int) -> bool:
    return any(low <= code <= high for low, high in ranges)


def _category(code: Any, in_negated_class: bool) -> Ranges:
    """The characters a category stands for: those both readings match, or inside a
    negated class (whose complement must hold only what both exclude) either."""
    c = sre_constants
    either = in_negated_class
    if code == c.CATEGORY_DIGIT:
        return _unicode_set("digit") if either else _DIGIT
    if code == c.CATEGORY_WORD:
        return _unicode_set("word") if either else _WORD
    if code == c.CATEGORY_SPACE:
        return _SPACE_IN_EITHER if either else _SPACE_IN_BOTH
    if code == c.CATEGORY_NOT_DIGIT:
        return complement(_DIGIT if either else _unicode_set("digit"))
    if code == c.CATEGORY_NOT_WORD:
        return complement(_WORD if either else _unicode_set("word"))
    if code == c.CATEGORY_NOT_SPACE:
        return complement(_SPACE_IN_BOTH if either else _SPACE_IN_EITHER)
    raise ValueError(f"the character category {code} is not supported")


def item_set(op: Any, value: Any, dot_all: bool = False) -> Ranges | None:
    """The code points that one parsed item matches, or None when the item is not
    a single character (a group, a repetition, an anchor)."""
    c = sre_constants
    if op == c.LITERAL:
        return [(value, value)]
    if op == c.NOT_LITERAL:
        return complement([(value, value)])
    if op == c.ANY:  # no line terminator (Python's: a line feed; ECMAScript's too), unless (?s)
        return [(0, MAX_CODE_POINT)] if dot_all else complement(_LINE_TERMINATORS)
    if op != c.IN:
        return None
    ranges: Ranges = []
    negate = any(inner_op == c.NEGATE for inner_op, _ in value)
    for inner_op, inner in value:
        if inner_op == c.NEGATE:
            continue
        if inner_op == c.LITERAL:
            ranges.append((inner, inner))
        elif inner_op == c.RANGE:
            ranges.append(inner)
        elif inner_op == c.CATEGORY:
            ranges.extend(_category(inner, negate))
        else:
            raise ValueError(f"the class item {inner_op} is not supported")
    ranges = normalized(ranges)
    return complement(ranges) if negate else ranges


def parse(pattern: str) -> Any:
    """Python's parse of ``pattern``; ValueError naming what is wrong with it."""
    try:
        return sre_parse.parse(pattern)
    except (re.error, OverflowError) as err:  # (a repeat count past 2**32: OverflowError)
        raise ValueError(f"{pattern!r} is not a valid regular expression: {err}") from None
    except RecursionError:
        raise ValueError(f"{pattern!r} nests too deeply") from None


def flags_of(parsed: Any) -> int:
    return parsed.state.flags


def check_reads_the_same(pattern: str, unparsed_ok: bool = True) -> None:
    """ValueError when ``pattern`` (a regex constraint, already without group names)
    uses what xgrammar would match as something else than ``re`` does: anchors
    other than ``^`` at its start and ``$`` at its end (of the whole pattern or of
    one of its top-level alternatives), ``\\A`` / ``\\Z``, and case-insensitive
    matching, possessive quantifiers, counts above ``MAX_REPEAT_COUNT``. A pattern
    Python cannot parse is left to xgrammar when ``unparsed_ok`` (its message names
    what it lacks; the caller refuses it afterwards if xgrammar read it), else refused."""
    try:
        parsed = parse(pattern)
    except ValueError:
        if unparsed_ok:
            return
        raise
    if flags_of(parsed) & re.IGNORECASE:
        raise ValueError("case-insensitive matching ((?i)) is not supported: spell out the cases")
    _check_items(parsed, at_start=True, at_end=True)


def _check_items(items: Any, at_start: bool, at_end: bool) -> None:
    """Check ``items``, a sequence that begins the whole pattern when ``at_start``
    and ends it when ``at_end`` (the top level, or an alternative or group there:
    Python's parser pulls ``^`` out of ``^ab|^cd``)."""
    c = sre_constants
    data = list(items)
    for at, (op, value) in enumerate(data):
        first, last = at_start and at == 0, at_end and at == len(data) - 1
        if op == c.AT:
            if value in (c.AT_BEGINNING_STRING, c.AT_END_STRING):
                raise ValueError(r"\A and \Z are not supported: write ^ and $")
            if value in (c.AT_BOUNDARY, c.AT_NON_BOUNDARY):
                raise ValueError(r"word boundaries (\b, \B) are not supported")
            if not ((value == c.AT_BEGINNING and first) or (value == c.AT_END and last)):
                raise ValueError(
                    "an anchor (^ or $) inside the pattern is not supported: a constraint "
                    "matches the whole answer, so ^ may only begin it and $ end it"
                )
        elif op == c.BRANCH:
            for branch in value[1]:
                _check_items(branch, first, last)
        elif op == c.SUBPATTERN:
            if value[1] & re.IGNORECASE:
                raise ValueError(
                    "case-insensitive matching ((?i:...)) is not supported: spell out the cases"
                )
            _check_items(value[3], first, last)
        elif op == getattr(c, "POSSESSIVE_REPEAT", None) or op == getattr(c, "ATOMIC_GROUP", None):
            raise ValueError("possessive quantifiers and atomic groups are not supported")
        elif is_repeat(op):
            low, high = value[0], value[1]
            if max(low, 0 if high == sre_constants.MAXREPEAT else high) > MAX_REPEAT_COUNT:
                # (xgrammar wrapped counts at 2**32: "{4294967297}" matched once)
                raise ValueError(f"repetition counts above {MAX_REPEAT_COUNT:,} are not supported")
            _check_items(value[2], False, False)


def is_repeat(op: Any) -> bool:
    """Whether a parsed item's op is a repetition (greedy, lazy or possessive)."""
    c = sre_constants
    return op in (c.MAX_REPEAT, c.MIN_REPEAT) or op == getattr(c, "POSSESSIVE_REPEAT", None)
