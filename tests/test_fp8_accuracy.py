"""Accuracy of quantization="fp8" against the unquantized model on fixed English
text, from prompt logprobs: top-1 next-token agreement and perplexity. The
SmolLM2 numbers are in tests/test_smollm2.py (it shares that module's converted
checkpoint); both are reported in docs/quantization.md."""

from __future__ import annotations

import math

import pytest
import torch

import mii
from helpers import tiny_config

# A few hundred tokens of fixed English text (the tiny tokenizer splits it finely).
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece "
    "of the 1889 World's Fair. Although initially criticised by some of France's leading "
    "artists and intellectuals for its design, it has since become a global cultural icon of "
    "France and one of the most recognisable structures in the world."
)


def score(path: str, text: str, **options) -> list:
    """Each position's prompt logprob entry of ``text`` (the first has none)."""
    with mii.pipeline(path, device="cpu", **options) as pipe:
        ids = pipe.engine.tokenizer(text).input_ids
        [scored] = pipe([ids], max_new_tokens=0, prompt_logprobs=1)
    return scored.prompt_logprobs[1:]


def compare(path: str, text: str, **options) -> tuple[float, float, float, torch.Tensor]:
    """(top-1 agreement, perplexity unquantized, perplexity fp8, |logprob difference|
    per token) of quantization="fp8" against the same model unquantized, on ``text``."""
    base = score(path, text, **options)
    fp8 = score(path, text, quantization="fp8", **options)
    agree = sum(a.top[0][0] == b.top[0][0] for a, b in zip(base, fp8)) / len(base)
    ppl = [math.exp(-sum(e.logprob for e in s) / len(s)) for s in (base, fp8)]
    diff = torch.tensor([a.logprob - b.logprob for a, b in zip(base, fp8)]).abs()
    return agree, ppl[0], ppl[1], diff


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory, tokenizer):
    """A tiny Llama trained for a few steps on TEXT, so that its next-token
    predictions mean something (a random model's top-1 is a near-tie everywhere)."""
    from transformers import AutoModelForCausalLM

    ids = tokenizer(TEXT).input_ids
    config = tiny_config("llama", tokenizer, max_position_embeddings=1024, initializer_range=0.02)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.tensor([ids])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: one thread is the fastest on a busy machine
    try:
        for _ in range(40):
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("fp8-trained")
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), len(ids)


def test_tiny_model_fp8_agrees_with_fp32(trained_tiny):
    """>= 97 % top-1 agreement, perplexity within 2 %, every token's logprob within
    0.5 nats (bounded error) on a few hundred tokens."""
    path, tokens = trained_tiny
    assert tokens > 200
    agree, ppl, ppl_fp8, diff = compare(path, TEXT)
    print(f"tiny: agreement {agree:.4f}, perplexity {ppl:.4f} -> {ppl_fp8:.4f}")
    assert agree >= 0.97, agree
    assert abs(ppl_fp8 - ppl) / ppl < 0.02, (ppl, ppl_fp8)
    assert diff.max() < 0.5 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert diff.max() > 0  # the weights did change
