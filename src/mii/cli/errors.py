"""The error a ``mii`` command reports to its user."""

from __future__ import annotations

import argparse
import difflib
import re


class CliError(Exception):
    """A user-facing failure: printed as one ``mii <command>: error: ...`` line;
    ``field``: the option it is about, whose flag the line then names."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def nearest_option(parser: argparse.ArgumentParser, message: str) -> str:
    """`` (did you mean --temperature?)`` for argparse's "unrecognized arguments"
    ``message`` when a given option is a near miss of one of ``parser``'s, else ""."""
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if not unknown:
        return ""
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for given in unknown.group(1).split():
        if given.startswith("-"):
            near = difflib.get_close_matches(given.split("=")[0], options, n=1, cutoff=0.8)
            if near:
                return f" (did you mean {near[0]}?)"
    return ""
