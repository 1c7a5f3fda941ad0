"""Where mii keeps files between runs: the demo checkpoint and the deployment
registry, under ``MII_CACHE_DIR`` (default ``~/.cache/mii``)."""

from __future__ import annotations

from pathlib import Path

from mii import envs


def cache_dir() -> Path:
    """mii's cache directory, as ``MII_CACHE_DIR`` says now (it may not exist yet)."""
    return envs.CACHE_DIR.get()
