"""A tiny built-in model so that mii runs offline, out of the box.

``demo_model_path()`` builds (once, then caches) a small Llama checkpoint with
random weights and a byte-level BPE tokenizer trained locally on a short text.
Its output is random text: it exists to show and test the machinery, not to
say anything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mii.cache import cache_dir

DEMO_VERSION = "v1"

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


def demo_model_path() -> Path:
    """Path of the cached demo checkpoint, building it on first use."""
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
