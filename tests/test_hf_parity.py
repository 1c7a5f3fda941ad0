"""Greedy tokens from mii equal transformers' generate on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

import mii
from helpers import PROMPTS, hf_greedy, tiny_config

NEW_TOKENS = 24
FAMILIES = ["llama", "llama-mha-tied", "llama3-rope", "mistral-window", "qwen2", "qwen2-window"]


def check_against_hf(pipe, hf_model, tokenizer, prompts, **params):
    responses = pipe(prompts, do_sample=False, max_new_tokens=NEW_TOKENS, **params)
    for prompt, response in zip(prompts, responses):
        expected = hf_greedy(hf_model, tokenizer, prompt, NEW_TOKENS)
        assert response.token_ids == expected, prompt
        assert response.generated_text == tokenizer.decode(expected, skip_special_tokens=True)
        assert response.generated_length == len(expected)
        assert response.prompt_length == len(tokenizer(prompt).input_ids)
        want_reason = "stop" if expected[-1] == tokenizer.eos_token_id else "length"
        assert response.finish_reason == want_reason
    return responses


@pytest.mark.parametrize("name", FAMILIES)
def test_single_requests_match_hf(checkpoints, tokenizer, name):
    path, hf_model = checkpoints(name)
    with mii.pipeline(str(path)) as pipe:
        for prompt in PROMPTS:
            check_against_hf(pipe, hf_model, tokenizer, [prompt])


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_batch_with_chunking_and_preemption_matches_hf(
    checkpoints, tokenizer, name, async_scheduling
):
    """A tiny token budget splits prompts over many passes and a KV pool too
    small for all requests at once forces preemption; no token may change,
    also when pass N+1 is scheduled before pass N's tokens are known."""
    path, hf_model = checkpoints(name)
    options = dict(
        token_budget=6,
        max_num_seqs=4,
        kv_block_size=4,
        num_kv_blocks=24,
        async_scheduling=async_scheduling,
    )
    with mii.pipeline(str(path), **options) as pipe:
        check_against_hf(pipe, hf_model, tokenizer, PROMPTS * 2)
        stats = pipe.engine.stats()
        assert stats["preemptions"] > 0, "the pool was meant to force preemption"
        assert stats["free_blocks"] == 24


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
def test_full_budget_batch_matches_hf(checkpoints, tokenizer, async_scheduling):
    path, hf_model = checkpoints("llama")
    options = dict(token_budget=4096, max_num_seqs=64, async_scheduling=async_scheduling)
    with mii.pipeline(str(path), **options) as pipe:
        check_against_hf(pipe, hf_model, tokenizer, PROMPTS)


@pytest.mark.parametrize(
    ("name", "family", "no_window"),
    [
        ("mistral-window", "mistral", {"sliding_window": None}),
        ("qwen2-window", "qwen2", {"use_sliding_window": False}),
    ],
)
def test_sliding_window_changes_the_answer(checkpoints, tokenizer, name, family, no_window):
    """Guard for the window tests: with the same weights, the window must matter,
    so matching HF with the window proves it is honoured."""
    from transformers import AutoModelForCausalLM

    _, windowed = checkpoints(name)
    overrides = {k: v for k, v in windowed.config.to_dict().items() if k in ("max_window_layers",)}
    config = tiny_config(family, tokenizer, **overrides, **no_window)
    unwindowed = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    unwindowed.load_state_dict(windowed.state_dict())
    differs = [
        hf_greedy(windowed, tokenizer, p, NEW_TOKENS)
        != hf_greedy(unwindowed, tokenizer, p, NEW_TOKENS)
        for p in PROMPTS
    ]
    assert any(differs)


def test_llama3_rope_scaling_changes_the_answer(checkpoints, tokenizer):
    """Same guard for Llama 3 rope scaling (long positions are affected)."""
    from transformers import AutoModelForCausalLM

    _, scaled = checkpoints("llama3-rope")
    config = tiny_config("llama", tokenizer, num_key_value_heads=1)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    plain.load_state_dict(scaled.state_dict())
    prompt = PROMPTS[3]
    assert hf_greedy(scaled, tokenizer, prompt, NEW_TOKENS) != hf_greedy(
        plain, tokenizer, prompt, NEW_TOKENS
    )


def test_logits_are_not_near_ties(checkpoints, tokenizer):
    """The oracle is only meaningful if argmax is robust to float reordering."""
    _, hf_model = checkpoints("llama")
    ids = torch.tensor([tokenizer(PROMPTS[1]).input_ids])
    with torch.no_grad():
        logits = hf_model(ids).logits[0]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
