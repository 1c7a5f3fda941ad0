"""Tiny checkpoints built with transformers itself, and the Hugging Face oracle."""

from __future__ import annotations

from pathlib import Path

import torch

from mii.demo import _CORPUS, train_tokenizer

PROMPTS = [
    "DeepSpeed is",
    "Seattle is a city on the west coast of the United States, known for rain",
    "The quick brown fox",
    "A blocked KV cache stores attention keys in fixed-size blocks, allocated as sequences grow. "
    "Continuous batching lets requests join",
    "Unicode: café 東京 😀",
]


def make_tokenizer():
    return train_tokenizer(_CORPUS.splitlines() * 4, vocab_size=400)


def tiny_config(family: str, tokenizer, **overrides):
    """A small config of ``family`` whose logits are far from ties (large init scale)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(**common)


def save_checkpoint(path: Path, config, tokenizer, seed: int = 0, safetensors: bool = True):
    """Save a random-weight model of ``config`` as a Hugging Face checkpoint; return the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    if safetensors:
        model.save_pretrained(path)
    else:  # the older PyTorch format (transformers 5 only writes safetensors)
        config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    return model


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy continuation from transformers (stops at EOS like mii does)."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


# Engine options that split prompts over many passes and force preemption.
TIGHT_OPTIONS = dict(token_budget=6, max_num_seqs=4, kv_block_size=4, num_kv_blocks=24)


def assert_matches_hf(
    model_dir,
    hf_model,
    tokenizer,
    prompts=PROMPTS,
    new_tokens: int = 24,
    expect_preemption=False,
    **engine_options,
):
    """Greedy tokens from mii on ``model_dir`` equal transformers' ``generate`` for
    every prompt, run as one mixed batch. Returns the engine stats."""
    import mii

    with mii.pipeline(str(model_dir), **engine_options) as pipe:
        responses = pipe(prompts, do_sample=False, max_new_tokens=new_tokens)
        for prompt, response in zip(prompts, responses):
            expected = hf_greedy(hf_model, tokenizer, prompt, new_tokens)
            assert response.token_ids == expected, prompt
            assert response.generated_text == tokenizer.decode(expected, skip_special_tokens=True)
            assert response.prompt_length == len(tokenizer(prompt).input_ids)
            want = "stop" if expected[-1] == tokenizer.eos_token_id else "length"
            assert response.finish_reason == want
        stats = pipe.engine.stats()
    if expect_preemption:
        assert stats["preemptions"] > 0, "the KV pool was meant to force preemption"
    assert stats["free_blocks"] == pipe.engine.core.blocks.num_blocks
    return stats
