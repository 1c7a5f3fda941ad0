"""run_event_loop: uvloop when installed, asyncio otherwise; main's errors as they are."""

from __future__ import annotations

import asyncio
import sys

import pytest

from mii.rpc.event_loop import run_event_loop


def loop_module_of(ran: list[str]):
    async def main():
        ran.append(type(asyncio.get_running_loop()).__module__)

    return main()


def test_an_import_error_inside_main_propagates_as_itself():
    """Before, it was caught as "no uvloop" and main re-run: "cannot reuse already
    awaited coroutine" hid the real error."""

    async def main():
        raise ImportError("an optional import failed during start-up")

    with pytest.raises(ImportError, match="an optional import failed during start-up"):
        run_event_loop(main())


def test_without_uvloop_runs_on_asyncio(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    ran: list[str] = []
    run_event_loop(loop_module_of(ran))
    assert ran and not ran[0].startswith("uvloop")


def test_with_uvloop_runs_on_uvloop():
    pytest.importorskip("uvloop")
    ran: list[str] = []
    run_event_loop(loop_module_of(ran))
    assert ran and ran[0].startswith("uvloop")
