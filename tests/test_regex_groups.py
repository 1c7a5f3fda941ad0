"""engine/regex_groups.py: named groups become plain groups; what only looks like
one (inside a character class, after an escape, a lookbehind) stays as written."""

import re

import pytest

from mii.engine.regex_groups import without_group_names


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"(?P<first_name>[a-z]+) (?P<n1>[0-9])", r"([a-z]+) ([0-9])"),
        (r"(?<year>\d{4})", r"(\d{4})"),
        (r"[(?P<]x", r"[(?P<]x"),  # a class: literal characters
        (r"[]a(?P<b>]x", r"[]a(?P<b>]x"),  # "]" first in a class is a literal
        (r"[^](?P<c>]", r"[^](?P<c>]"),
        (r"\(?P<x>a\)", r"\(?P<x>a\)"),  # escaped parentheses
        (r"\\(?P<x>a)", r"\\(a)"),  # an escaped backslash, then a group
        (r"(?<=a)b(?<!c)", r"(?<=a)b(?<!c)"),  # lookbehinds
        (r"(?:a)(b)", r"(?:a)(b)"),
    ],
)
def test_named_groups_lose_their_names_only(pattern, expected):
    assert without_group_names(pattern) == expected


def test_the_plain_pattern_matches_what_the_named_one_does():
    pattern = r"(?P<user>[a-z_]+)@(?P<host_1>[a-z]+)\.(com|org)"
    plain = without_group_names(pattern)
    for text in ("ann_b@site.com", "x@y.org", "bad@site.net", "@site.com"):
        assert bool(re.fullmatch(pattern, text)) == bool(re.fullmatch(plain, text))
