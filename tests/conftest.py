"""Shared fixtures: a locally trained tokenizer and tiny checkpoints per family."""

from __future__ import annotations

import os

import torch

# Triton kernels decide at definition (import) time whether they are interpreted;
# without a GPU they must be, in every test module, whichever imports mii first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from helpers import make_tokenizer, save_checkpoint, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> (family, config overrides). Every checkpoint of the families.
CHECKPOINTS = {
    "llama": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE, "num_key_value_heads": 1}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen2-window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    ),
}


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    """Build each checkpoint once per session; returns name -> (path, HF model)."""
    cache: dict[str, tuple] = {}

    def get(name: str, **extra):
        key = name + repr(sorted(extra.items()))
        if key not in cache:
            family, overrides = CHECKPOINTS[name]
            path = tmp_path_factory.mktemp(name)
            config = tiny_config(family, tokenizer, **{**overrides, **extra})
            cache[key] = (path, save_checkpoint(path, config, tokenizer))
        return cache[key]

    return get


@pytest.fixture
def llama(checkpoints):
    """Path of the tiny llama checkpoint."""
    return str(checkpoints("llama")[0])
