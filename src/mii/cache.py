"""Where mii keeps files between runs: the demo checkpoint, converted GGUF files
(``gguf/``) and the deployment registry, under ``MII_CACHE_DIR`` (default
``~/.cache/mii``)."""

from __future__ import annotations

from pathlib import Path

import mii.envs as envs


def cache_dir() -> Path:
    """mii's cache directory, as ``MII_CACHE_DIR`` says now (it may not exist yet)."""
    return envs.CACHE_DIR.get()
