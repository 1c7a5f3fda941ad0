"""The event loop that mii's server processes run on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_event_loop(main: Coroutine[Any, Any, Any]) -> None:
    """Run ``main`` on uvloop when it is installed, else on asyncio's loop.

    Only a failed ``import uvloop`` falls back to asyncio; an ``ImportError``
    raised while ``main`` runs is ``main``'s error and propagates as itself
    (``main`` has been awaited by then and cannot run a second time)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
