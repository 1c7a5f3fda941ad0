"""The error a ``mii`` command reports to its user."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure: printed as one ``mii <command>: error: ...`` line."""
