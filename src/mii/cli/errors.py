"""The error a ``mii`` command reports to its user."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any


class CliError(Exception):
    """A user-facing failure: printed as one ``mii <command>: error: ...`` line;
    ``field``: the option it is about, whose flag the line then names."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def nearest_option(parser: argparse.ArgumentParser, message: str) -> str:
    """`` (did you mean --temperature?)`` for argparse's "unrecognized arguments"
    ``message`` when a given option is a near miss of one of ``parser``'s, or the
    start of just one (abbreviations are not taken), else ""."""
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if not unknown:
        return ""
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for given in unknown.group(1).split():
        if given.startswith("-"):
            flag = given.split("=")[0]
            near = difflib.get_close_matches(flag, options, n=1, cutoff=0.8)
            longer = [o for o in options if o.startswith(flag)] if flag.startswith("--") else []
            near = near or (longer if len(longer) == 1 else [])
            if near:
                return f" (did you mean {near[0]}?)"
    return ""


def no_deployment_at(client: Any, target: str) -> CliError:
    """The error for a ``host:port`` where no deployment answers, with the client's
    words for what does (an HTTP port: "its REST / OpenAI port?"; nothing; ...)."""
    try:
        client.stats()
    except Exception as err:
        return CliError(f"no mii deployment answers at {target}: {err}")
    return CliError(f"no mii deployment answers at {target} (it is not serving yet?)")
